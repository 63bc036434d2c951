//! Verification through the public API with keys from configuration and a manual clock: every
//! accepted algorithm and every rejection class.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    AUDIENCE, ISSUER, NOW, TestKey, encode_json, fixture_path, jwks, sign_raw, valid_claims,
};
use jsonwebtoken::{Algorithm, EncodingKey};
use portcullis_jwt::{
    ClaimToHeader, ConfigProblem, FetchError, InvalidReason, JwtObserver, KeySource, ManualClock,
    ProviderConfig, RequestView, SignatureAlgorithm, TokenLocation, TokenOutcome, Verifier,
    VerifierConfig,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn provider(keys: &[Value]) -> ProviderConfig {
    let mut provider = ProviderConfig::new("main", ISSUER, KeySource::Inline { jwks: jwks(keys) });
    provider.audiences = vec![AUDIENCE.to_owned()];
    provider
}

fn verifier_for(providers: Vec<ProviderConfig>, clock: &Arc<ManualClock>) -> Verifier {
    Verifier::builder(VerifierConfig {
        providers,
        ..Default::default()
    })
    .clock(clock.clone())
    .build()
    .expect("configuration is valid")
}

fn verifier(keys: &[Value]) -> (Verifier, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    (verifier_for(vec![provider(keys)], &clock), clock)
}

async fn authenticate_headers(
    verifier: &Verifier,
    headers: &[(&str, &str)],
    path: &str,
) -> TokenOutcome {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    verifier
        .authenticate(&RequestView::new(&headers, path))
        .await
}

async fn bearer(verifier: &Verifier, token: &str) -> TokenOutcome {
    authenticate_headers(
        verifier,
        &[("authorization", &format!("Bearer {token}"))],
        "/",
    )
    .await
}

fn invalid_reason(outcome: &TokenOutcome) -> InvalidReason {
    match outcome {
        TokenOutcome::Invalid(invalid) => invalid.reason,
        other => panic!("expected an invalid token, got {other:?}"),
    }
}

fn invalid_message(outcome: &TokenOutcome) -> String {
    match outcome {
        TokenOutcome::Invalid(invalid) => invalid.message.clone(),
        other => panic!("expected an invalid token, got {other:?}"),
    }
}

fn valid_identity(outcome: TokenOutcome) -> portcullis_jwt::Identity {
    match outcome {
        TokenOutcome::Valid(identity) => identity,
        other => panic!("expected a valid token, got {other:?}"),
    }
}

fn claims_with(changes: Value) -> Value {
    let mut claims = valid_claims();
    for (name, value) in changes.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(name);
        } else {
            claims[name] = value.clone();
        }
    }
    claims
}

#[tokio::test]
async fn valid_token_gives_full_identity() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let token = key.sign(&valid_claims());

    let identity = valid_identity(bearer(&verifier, &token).await);

    let expected_fingerprint = hex::encode(&Sha256::digest(token.as_bytes())[..8]);
    assert_eq!(identity.provider, "main");
    assert_eq!(identity.issuer, ISSUER);
    assert_eq!(identity.subject.as_deref(), Some("alice"));
    assert_eq!(identity.audiences, vec![AUDIENCE.to_owned()]);
    assert_eq!(identity.kid.as_deref(), Some("rsa-a"));
    assert_eq!(identity.algorithm, SignatureAlgorithm::RS256);
    assert_eq!(identity.token_fingerprint, expected_fingerprint);
    assert_eq!(identity.token_fingerprint.len(), 16);
    assert_eq!(identity.claims.get("sub"), Some(&json!("alice")));
    assert_eq!(
        identity.expires_at,
        Some(std::time::UNIX_EPOCH + Duration::from_secs(NOW + 300))
    );
    assert_eq!(
        identity.locations,
        vec![TokenLocation::authorization_bearer()]
    );
}

#[tokio::test]
async fn every_supported_algorithm_verifies() {
    let cases = [
        ("rsa-a", Algorithm::RS256),
        ("rsa-a", Algorithm::RS384),
        ("rsa-a", Algorithm::RS512),
        ("rsa-a", Algorithm::PS256),
        ("rsa-a", Algorithm::PS384),
        ("rsa-a", Algorithm::PS512),
        ("p256-a", Algorithm::ES256),
        ("p384-a", Algorithm::ES384),
        ("ed25519-a", Algorithm::EdDSA),
    ];
    for (file, algorithm) in cases {
        let key = TestKey::load(file, file, algorithm);
        // Without alg in the JWK, only the key type and curve restrict the algorithm.
        let (verifier, _clock) = verifier(&[key.jwk_without_alg()]);
        let outcome = bearer(&verifier, &key.sign(&valid_claims())).await;
        assert!(
            matches!(outcome, TokenOutcome::Valid(_)),
            "{file} with {algorithm:?}: {outcome:?}"
        );
    }
}

#[tokio::test]
async fn expiry_edges_follow_the_skew() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, clock) = verifier(&[key.jwk()]);
    let token = key.sign(&claims_with(json!({"exp": NOW})));

    clock.set_unix_seconds(NOW + 59);
    assert!(matches!(
        bearer(&verifier, &token).await,
        TokenOutcome::Valid(_)
    ));

    clock.set_unix_seconds(NOW + 60);
    let outcome = bearer(&verifier, &token).await;
    assert_eq!(invalid_reason(&outcome), InvalidReason::Expired);
    assert_eq!(
        invalid_message(&outcome),
        format!("token expired at {NOW} (Unix time)")
    );
}

#[tokio::test]
async fn not_before_edges_follow_the_skew() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, clock) = verifier(&[key.jwk()]);
    let token = key.sign(&claims_with(json!({"nbf": NOW + 100, "iat": null})));

    clock.set_unix_seconds(NOW + 39);
    assert_eq!(
        invalid_reason(&bearer(&verifier, &token).await),
        InvalidReason::NotYetValid
    );

    clock.set_unix_seconds(NOW + 40);
    assert!(matches!(
        bearer(&verifier, &token).await,
        TokenOutcome::Valid(_)
    ));
}

#[tokio::test]
async fn cached_token_stops_at_expiry() {
    let key = TestKey::rsa("rsa-a");
    let observer = Arc::new(RecordingObserver::default());
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    let verifier = Verifier::builder(VerifierConfig {
        providers: vec![provider(&[key.jwk()])],
        ..Default::default()
    })
    .clock(clock.clone())
    .observer(observer.clone())
    .build()
    .unwrap();
    let token = key.sign(&claims_with(json!({"exp": NOW + 10})));

    assert!(matches!(
        bearer(&verifier, &token).await,
        TokenOutcome::Valid(_)
    ));
    assert!(matches!(
        bearer(&verifier, &token).await,
        TokenOutcome::Valid(_)
    ));
    assert_eq!(
        observer.checks(),
        vec![("valid".to_owned(), false), ("valid".to_owned(), true)]
    );

    clock.set_unix_seconds(NOW + 70);
    assert_eq!(
        invalid_reason(&bearer(&verifier, &token).await),
        InvalidReason::Expired
    );
}

#[tokio::test]
async fn audience_string_and_array_are_checked() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);

    let as_string = key.sign(&claims_with(json!({"aud": AUDIENCE})));
    assert!(matches!(
        bearer(&verifier, &as_string).await,
        TokenOutcome::Valid(_)
    ));

    let as_array = key.sign(&claims_with(json!({"aud": ["billing", AUDIENCE]})));
    assert_eq!(
        valid_identity(bearer(&verifier, &as_array).await).audiences,
        vec!["billing".to_owned(), AUDIENCE.to_owned()]
    );

    let wrong_string = key.sign(&claims_with(json!({"aud": "billing"})));
    let outcome = bearer(&verifier, &wrong_string).await;
    assert_eq!(invalid_reason(&outcome), InvalidReason::AudienceMismatch);
    assert_eq!(
        invalid_message(&outcome),
        "token audience billing is not accepted"
    );

    let wrong_array = key.sign(&claims_with(json!({"aud": ["billing", "crm"]})));
    assert_eq!(
        invalid_reason(&bearer(&verifier, &wrong_array).await),
        InvalidReason::AudienceMismatch
    );

    let missing = key.sign(&claims_with(json!({"aud": null})));
    assert_eq!(
        invalid_reason(&bearer(&verifier, &missing).await),
        InvalidReason::AudienceMismatch
    );
}

#[tokio::test]
async fn unknown_issuer_is_a_mismatch() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let token = key.sign(&claims_with(json!({"iss": "https://other.test"})));

    let outcome = bearer(&verifier, &token).await;

    assert_eq!(invalid_reason(&outcome), InvalidReason::IssuerMismatch);
    assert_eq!(
        invalid_message(&outcome),
        "no provider accepts issuer https://other.test in header authorization"
    );
}

#[tokio::test]
async fn missing_issuer_is_a_missing_claim() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let outcome = bearer(&verifier, &key.sign(&claims_with(json!({"iss": null})))).await;
    assert_eq!(invalid_reason(&outcome), InvalidReason::MissingClaim);
}

#[tokio::test]
async fn rsa_token_against_ec_key_is_not_allowed() {
    let ec = TestKey::load("p256-a", "shared-kid", Algorithm::ES256);
    let rsa = TestKey::load("rsa-a", "shared-kid", Algorithm::RS256);
    let (verifier, _clock) = verifier(&[ec.jwk_without_alg()]);

    let outcome = bearer(&verifier, &rsa.sign(&valid_claims())).await;

    assert_eq!(invalid_reason(&outcome), InvalidReason::AlgorithmNotAllowed);
    assert_eq!(
        invalid_message(&outcome),
        "key shared-kid does not accept algorithm RS256"
    );
}

#[tokio::test]
async fn es256_token_against_p384_key_is_not_allowed() {
    let p384 = TestKey::load("p384-a", "ec-kid", Algorithm::ES384);
    let p256 = TestKey::load("p256-a", "ec-kid", Algorithm::ES256);
    let (verifier, _clock) = verifier(&[p384.jwk_without_alg()]);

    let outcome = bearer(&verifier, &p256.sign(&valid_claims())).await;

    assert_eq!(invalid_reason(&outcome), InvalidReason::AlgorithmNotAllowed);
}

#[tokio::test]
async fn algorithm_must_equal_the_jwk_alg() {
    let rs256 = TestKey::load("rsa-a", "rsa-a", Algorithm::RS256);
    let ps256 = TestKey::load("rsa-a", "rsa-a", Algorithm::PS256);
    let (verifier, _clock) = verifier(&[rs256.jwk()]);

    let outcome = bearer(&verifier, &ps256.sign(&valid_claims())).await;

    assert_eq!(invalid_reason(&outcome), InvalidReason::AlgorithmNotAllowed);
    assert_eq!(
        invalid_message(&outcome),
        "key rsa-a does not accept algorithm PS256"
    );
}

#[tokio::test]
async fn hs256_signed_with_rsa_public_key_is_rejected() {
    let rsa = TestKey::rsa("rsa-a");
    let public_pem = std::fs::read(fixture_path("keys/rsa-a.public.pem")).unwrap();
    let forged = sign_raw(
        &json!({"alg": "HS256", "kid": "rsa-a", "typ": "JWT"}),
        &valid_claims(),
        &EncodingKey::from_secret(&public_pem).unwrap(),
        Algorithm::HS256,
    );

    // Without a shared secret, HMAC is not allowed at all.
    let (verifier, _clock) = verifier(&[rsa.jwk()]);
    let outcome = bearer(&verifier, &forged).await;
    assert_eq!(invalid_reason(&outcome), InvalidReason::AlgorithmNotAllowed);
    assert_eq!(
        invalid_message(&outcome),
        "algorithm HS256 is not allowed; the provider has no shared secret"
    );

    // With a shared secret, only that secret verifies HMAC tokens, never the public key.
    let secret_file = secret_file(b"an HMAC secret of more than 32 bytes, test only\n");
    let mut with_secret = provider(&[rsa.jwk()]);
    with_secret.hmac_secret_file = Some(secret_file.path().to_owned());
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    let verifier = verifier_for(vec![with_secret], &clock);
    assert_eq!(
        invalid_reason(&bearer(&verifier, &forged).await),
        InvalidReason::BadSignature
    );
}

#[tokio::test]
async fn hmac_token_verifies_with_the_configured_secret() {
    let secret = b"an HMAC secret of more than 32 bytes, test only";
    let secret_file = secret_file(&[secret.as_slice(), b"\n"].concat());
    let mut config = ProviderConfig::new(
        "shared",
        ISSUER,
        KeySource::Inline {
            jwks: String::new(),
        },
    );
    config.keys = None;
    config.hmac_secret_file = Some(secret_file.path().to_owned());
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    let verifier = verifier_for(vec![config], &clock);

    let token = sign_raw(
        &json!({"alg": "HS256"}),
        &valid_claims(),
        &EncodingKey::from_secret(secret).unwrap(),
        Algorithm::HS256,
    );
    let identity = valid_identity(bearer(&verifier, &token).await);
    assert_eq!(identity.algorithm, SignatureAlgorithm::HS256);

    // HS512 needs a 64-byte secret (RFC 7518, section 3.2); this one has 47 bytes.
    let token = sign_raw(
        &json!({"alg": "HS512"}),
        &valid_claims(),
        &EncodingKey::from_secret(secret).unwrap(),
        Algorithm::HS512,
    );
    let outcome = bearer(&verifier, &token).await;
    assert_eq!(invalid_reason(&outcome), InvalidReason::AlgorithmNotAllowed);
    assert_eq!(
        invalid_message(&outcome),
        "algorithm HS512 needs a secret of at least 64 bytes"
    );
}

#[tokio::test]
async fn unsigned_token_is_not_allowed() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let token = format!(
        "{}.{}.",
        encode_json(&json!({"alg": "none", "typ": "JWT"})),
        encode_json(&valid_claims())
    );

    let outcome = bearer(&verifier, &token).await;

    assert_eq!(invalid_reason(&outcome), InvalidReason::AlgorithmNotAllowed);
    assert_eq!(
        invalid_message(&outcome),
        "unsigned tokens (alg none) are not accepted"
    );
}

#[tokio::test]
async fn tokens_naming_keys_are_rejected_even_when_signed() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    for (name, value) in [
        ("jku", json!("http://127.0.0.1:9/jwks")),
        ("x5u", json!("http://127.0.0.1:9/cert.pem")),
        ("jwk", key.jwk()),
        (
            "x5c",
            json!(["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]),
        ),
    ] {
        let mut header = json!({"alg": "RS256", "kid": "rsa-a"});
        header[name] = value;
        let token = key.sign_with_header(&header, &valid_claims());
        assert_eq!(
            invalid_reason(&bearer(&verifier, &token).await),
            InvalidReason::KeyInToken,
            "header {name}"
        );
    }
}

#[tokio::test]
async fn malformed_tokens_are_rejected() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let good = key.sign(&valid_claims());
    let (header, rest) = good.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();

    let cases = [
        (
            format!("{header}!.{payload}.{signature}"),
            "token header is not valid base64url",
        ),
        (
            format!("{header}.{}.{signature}", encode_json(&json!("text"))),
            "token payload is not a JSON object",
        ),
        (
            format!("{header}.e3*x.{signature}"),
            "token payload is not valid base64url",
        ),
        (
            format!("{header}.{}.{signature}", base64_text("{\"iss\":")),
            "token payload is not valid JSON",
        ),
        (
            format!("{header}{payload}{signature}"),
            "token has 1 segments, expected 3",
        ),
        (
            format!("{header}.{payload}"),
            "token has 2 segments, expected 3",
        ),
        (
            format!("{header}.{payload}.{signature}.extra"),
            "token has 4 segments, expected 3",
        ),
        (
            format!("{header}.{payload}.{signature}.a.b"),
            "encrypted tokens (JWE) are not supported",
        ),
    ];
    for (token, message) in cases {
        let outcome = bearer(&verifier, &token).await;
        assert_eq!(
            invalid_reason(&outcome),
            InvalidReason::Malformed,
            "{message}"
        );
        assert_eq!(invalid_message(&outcome), message);
    }
}

#[tokio::test]
async fn tampered_payload_has_a_bad_signature() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let good = key.sign(&valid_claims());
    let (header, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let tampered = format!(
        "{header}.{}.{signature}",
        encode_json(&claims_with(json!({"sub": "mallory"})))
    );

    let outcome = bearer(&verifier, &tampered).await;

    assert_eq!(invalid_reason(&outcome), InvalidReason::BadSignature);
}

#[tokio::test]
async fn other_key_signature_is_bad() {
    let published = TestKey::rsa("rsa-a");
    let impostor = TestKey::load("rsa-b", "rsa-a", Algorithm::RS256);
    let (verifier, _clock) = verifier(&[published.jwk()]);

    let outcome = bearer(&verifier, &impostor.sign(&valid_claims())).await;

    assert_eq!(invalid_reason(&outcome), InvalidReason::BadSignature);
}

#[tokio::test]
async fn local_keys_reject_unknown_kid() {
    let published = TestKey::rsa("rsa-a");
    let other = TestKey::load("rsa-b", "rsa-b", Algorithm::RS256);
    let (verifier, _clock) = verifier(&[published.jwk()]);

    let outcome = bearer(&verifier, &other.sign(&valid_claims())).await;

    assert_eq!(invalid_reason(&outcome), InvalidReason::UnknownKey);
    assert_eq!(invalid_message(&outcome), "no key with kid rsa-b");
}

#[tokio::test]
async fn token_without_kid_tries_fitting_keys() {
    let first = TestKey::load("rsa-b", "rsa-b", Algorithm::RS256);
    let second = TestKey::rsa("rsa-a");
    let ec = TestKey::load("p256-a", "p256-a", Algorithm::ES256);
    let (verifier, _clock) = verifier(&[ec.jwk(), first.jwk(), second.jwk()]);

    let token = second.sign_with_header(&json!({"alg": "RS256"}), &valid_claims());
    let identity = valid_identity(bearer(&verifier, &token).await);
    assert_eq!(identity.kid, None);

    let no_fitting_key = TestKey::load("p384-a", "x", Algorithm::ES384)
        .sign_with_header(&json!({"alg": "ES384"}), &valid_claims());
    let outcome = bearer(&verifier, &no_fitting_key).await;
    assert_eq!(invalid_reason(&outcome), InvalidReason::UnknownKey);
    assert_eq!(invalid_message(&outcome), "no key accepts algorithm ES384");
}

#[tokio::test]
async fn key_without_kid_verifies_tokens_with_any_kid() {
    let key = TestKey::rsa("issuer-assigned-kid");
    let mut jwk = key.jwk();
    jwk.as_object_mut().unwrap().remove("kid");
    let (verifier, _clock) = verifier(&[jwk]);

    let identity = valid_identity(bearer(&verifier, &key.sign(&valid_claims())).await);

    assert_eq!(identity.kid.as_deref(), Some("issuer-assigned-kid"));
}

#[tokio::test]
async fn oversized_token_is_rejected_before_decoding() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let oversized = "a".repeat(8 * 1024 + 1);

    let outcome = bearer(&verifier, &oversized).await;
    assert_eq!(invalid_reason(&outcome), InvalidReason::TooLarge);
    assert_eq!(
        invalid_message(&outcome),
        "token is 8193 bytes, more than the maximum of 8192"
    );

    let at_limit = "a".repeat(8 * 1024);
    assert_eq!(
        invalid_reason(&bearer(&verifier, &at_limit).await),
        InvalidReason::Malformed
    );
}

#[tokio::test]
async fn missing_exp_and_required_claims_are_reported() {
    let key = TestKey::rsa("rsa-a");
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    let mut config = provider(&[key.jwk()]);
    config.required_claims = vec!["tenant".to_owned()];
    let verifier = verifier_for(vec![config], &clock);

    let no_exp = key.sign(&claims_with(json!({"exp": null, "tenant": "acme"})));
    assert_eq!(
        invalid_message(&bearer(&verifier, &no_exp).await),
        "token has no exp claim"
    );

    let no_tenant = key.sign(&valid_claims());
    let outcome = bearer(&verifier, &no_tenant).await;
    assert_eq!(invalid_reason(&outcome), InvalidReason::MissingClaim);
    assert_eq!(invalid_message(&outcome), "token has no tenant claim");

    let complete = key.sign(&claims_with(json!({"tenant": "acme"})));
    assert!(matches!(
        bearer(&verifier, &complete).await,
        TokenOutcome::Valid(_)
    ));
}

#[tokio::test]
async fn bad_jwks_keys_skipped_and_reported() {
    let good = TestKey::rsa("rsa-a");
    let small = TestKey::load("rsa-1024", "rsa-1024", Algorithm::RS256);
    let mut not_on_curve = TestKey::load("p256-a", "bad-point", Algorithm::ES256).jwk();
    not_on_curve["y"] = json!(base64_bytes(&[7u8; 32]));
    let keys = [
        json!({"kty": "RSA", "use": "enc", "kid": "enc-key", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"}),
        json!({"kty": "PQC", "kid": "future"}),
        json!({"kty": "RSA", "kid": "bad-n", "n": "not base64!", "e": "AQAB"}),
        small.jwk(),
        not_on_curve,
        json!({"kty": "OKP", "crv": "Ed25519", "kid": "short-ed", "x": base64_bytes(&[1u8; 16])}),
        json!({"kty": "oct", "kid": "secret", "k": "c2VjcmV0"}),
        json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"}),
        json!("not an object"),
        good.jwk(),
    ];
    let (verifier, _clock) = verifier(&keys);

    let status = &verifier.status()[0];
    let skipped: Vec<(usize, Option<&str>, &str)> = status
        .skipped_keys
        .iter()
        .map(|key| (key.index, key.kid.as_deref(), key.reason.as_str()))
        .collect();
    assert_eq!(
        skipped,
        vec![
            (0, Some("enc-key"), "use is \"enc\", not \"sig\""),
            (1, Some("future"), "unsupported kty \"PQC\""),
            (2, Some("bad-n"), "n is not valid base64url"),
            (
                3,
                Some("rsa-1024"),
                "RSA modulus has 1024 bits, expected 2048 to 8192"
            ),
            (
                4,
                Some("bad-point"),
                "public key is not a valid point on its curve"
            ),
            (5, Some("short-ed"), "Ed25519 x must be 32 bytes"),
            (
                6,
                Some("secret"),
                "symmetric (oct) keys are not loaded from a JWKS; use hmac_secret_file"
            ),
            (7, Some("p521"), "unsupported EC curve \"P-521\""),
            (8, None, "not a JSON object"),
        ]
    );
    assert_eq!(status.key_count, 1);
    assert!(matches!(
        bearer(&verifier, &good.sign(&valid_claims())).await,
        TokenOutcome::Valid(_)
    ));
}

#[test]
fn jwks_without_usable_keys_is_a_configuration_error() {
    let config = provider(&[json!({"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"})]);
    let error = Verifier::new(VerifierConfig {
        providers: vec![config],
        ..Default::default()
    })
    .expect_err("rejected");
    assert_eq!(
        error.to_string(),
        "invalid JWT configuration: provider main: JWKS from inline configuration is unusable: JWKS has no usable signing key (1 skipped)"
    );
}

#[test]
fn every_configuration_problem_is_reported() {
    let mut insecure = ProviderConfig::new(
        "remote",
        "https://a.test",
        KeySource::RemoteJwks {
            uri: "http://a.test/jwks".to_owned(),
        },
    );
    insecure.algorithms = vec![SignatureAlgorithm::HS256];
    let short_secret = secret_file(b"too short");
    let mut duplicate = ProviderConfig::new("remote", "https://a.test", KeySource::OidcDiscovery);
    duplicate.hmac_secret_file = Some(short_secret.path().to_owned());

    let error = Verifier::new(VerifierConfig {
        providers: vec![insecure, duplicate],
        ..Default::default()
    })
    .expect_err("rejected");

    let problems = &error.problems;
    assert_eq!(problems.len(), 5, "{error}");
    assert!(matches!(&problems[0], ConfigProblem::DuplicateName { name } if name == "remote"));
    assert!(
        matches!(&problems[1], ConfigProblem::DuplicateIssuer { issuer, .. } if issuer == "https://a.test")
    );
    assert!(
        matches!(&problems[2], ConfigProblem::HmacWithoutSecret { algorithm, .. } if algorithm == "HS256")
    );
    assert!(matches!(
        &problems[3],
        ConfigProblem::Url { source: FetchError::InsecureUrl { url }, .. } if url == "http://a.test/jwks"
    ));
    assert!(matches!(
        &problems[4],
        ConfigProblem::HmacSecretTooShort { length: 9, .. }
    ));
}

#[test]
fn unreadable_extra_ca_file_is_a_configuration_error() {
    let provider = ProviderConfig::new(
        "remote",
        ISSUER,
        KeySource::RemoteJwks {
            uri: "https://issuer.test/jwks".to_owned(),
        },
    );
    let mut config = VerifierConfig {
        providers: vec![provider],
        ..Default::default()
    };
    config.http.extra_ca_file = Some("/nonexistent/ca.pem".into());

    let error = Verifier::new(config).expect_err("rejected");

    assert_eq!(error.problems.len(), 1, "{error}");
    assert!(
        error.to_string().starts_with(
            "invalid JWT configuration: cannot read extra CA file /nonexistent/ca.pem: "
        ),
        "{error}"
    );
}

#[tokio::test]
async fn bearer_scheme_is_case_insensitive() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let token = key.sign(&valid_claims());
    for scheme in ["Bearer", "bearer", "BEARER", "bEARER"] {
        let value = format!("{scheme} {token}");
        let outcome = authenticate_headers(&verifier, &[("authorization", &value)], "/").await;
        assert!(matches!(outcome, TokenOutcome::Valid(_)), "scheme {scheme}");
    }
    let basic =
        authenticate_headers(&verifier, &[("authorization", "Basic dXNlcjpwYXNz")], "/").await;
    assert_eq!(basic, TokenOutcome::NoToken);
}

#[tokio::test]
async fn empty_bearer_token_is_malformed() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let outcome = authenticate_headers(&verifier, &[("authorization", "Bearer ")], "/").await;
    assert_eq!(invalid_message(&outcome), "token is empty");
}

#[tokio::test]
async fn cookie_and_query_locations_are_read() {
    let key = TestKey::rsa("rsa-a");
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    let mut config = provider(&[key.jwk()]);
    config.locations = vec![
        TokenLocation::Cookie {
            name: "session".to_owned(),
        },
        TokenLocation::QueryParameter {
            name: "jwt".to_owned(),
        },
    ];
    let verifier = verifier_for(vec![config], &clock);
    let token = key.sign(&valid_claims());

    let cookie = format!("theme=dark; session={token}");
    let identity =
        valid_identity(authenticate_headers(&verifier, &[("cookie", &cookie)], "/").await);
    assert_eq!(
        identity.locations,
        vec![TokenLocation::Cookie {
            name: "session".to_owned()
        }]
    );

    let path = format!("/orders?page=2&jwt={token}");
    let identity = valid_identity(authenticate_headers(&verifier, &[], &path).await);
    assert_eq!(
        identity.locations,
        vec![TokenLocation::QueryParameter {
            name: "jwt".to_owned()
        }]
    );

    // The Authorization header is not a configured location of this provider.
    let bearer_header = format!("Bearer {token}");
    assert_eq!(
        authenticate_headers(&verifier, &[("authorization", &bearer_header)], "/").await,
        TokenOutcome::NoToken
    );
}

#[tokio::test]
async fn several_valid_tokens_of_one_caller_are_accepted() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let header_token = key.sign(&valid_claims());
    let query_token = key.sign(&claims_with(json!({"exp": NOW + 200})));

    let bearer_header = format!("Bearer {header_token}");
    let path = format!("/?access_token={query_token}");
    let identity = valid_identity(
        authenticate_headers(&verifier, &[("authorization", &bearer_header)], &path).await,
    );

    assert_eq!(
        identity.locations,
        vec![
            TokenLocation::authorization_bearer(),
            TokenLocation::QueryParameter {
                name: "access_token".to_owned()
            }
        ]
    );
}

#[tokio::test]
async fn one_invalid_token_among_several_is_ambiguous() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let valid = key.sign(&valid_claims());
    let expired = key.sign(&claims_with(json!({"exp": NOW - 3600})));

    let joined = format!("Bearer {valid}, Bearer {expired}");
    let outcome = authenticate_headers(&verifier, &[("authorization", &joined)], "/").await;

    assert_eq!(invalid_reason(&outcome), InvalidReason::Ambiguous);
    assert_eq!(
        invalid_message(&outcome),
        "request carries 2 tokens and the one in header authorization is invalid (expired)"
    );
}

#[tokio::test]
async fn more_than_eight_tokens_are_rejected() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let tokens: Vec<String> = (0..9)
        .map(|serial| format!("Bearer {}", key.sign(&claims_with(json!({"jti": serial})))))
        .collect();

    let eight = tokens[..8].join(", ");
    let outcome = authenticate_headers(&verifier, &[("authorization", &eight)], "/").await;
    assert!(matches!(outcome, TokenOutcome::Valid(_)), "{outcome:?}");

    let nine = tokens.join(", ");
    let outcome = authenticate_headers(&verifier, &[("authorization", &nine)], "/").await;
    assert_eq!(invalid_reason(&outcome), InvalidReason::Ambiguous);
    assert_eq!(
        invalid_message(&outcome),
        "request carries 9 tokens, more than the maximum of 8"
    );
}

#[tokio::test]
async fn valid_tokens_of_different_callers_are_ambiguous() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let alice = key.sign(&valid_claims());
    let bob = key.sign(&claims_with(json!({"sub": "bob"})));

    let bearer_header = format!("Bearer {alice}");
    let path = format!("/?access_token={bob}");
    let outcome =
        authenticate_headers(&verifier, &[("authorization", &bearer_header)], &path).await;

    assert_eq!(invalid_reason(&outcome), InvalidReason::Ambiguous);
    assert_eq!(
        invalid_message(&outcome),
        "request carries 2 tokens for different callers"
    );
}

#[tokio::test]
async fn providers_are_chosen_by_issuer() {
    let first = TestKey::rsa("rsa-a");
    let second = TestKey::load("p256-a", "p256-a", Algorithm::ES256);
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    let mut other = ProviderConfig::new(
        "other",
        "https://other.test",
        KeySource::Inline {
            jwks: jwks(&[second.jwk()]),
        },
    );
    other.audiences = vec![AUDIENCE.to_owned()];
    let verifier = verifier_for(vec![provider(&[first.jwk()]), other], &clock);

    let from_other = second.sign(&claims_with(json!({"iss": "https://other.test"})));
    assert_eq!(
        valid_identity(bearer(&verifier, &from_other).await).provider,
        "other"
    );

    // A token of one issuer signed by the other issuer's key does not verify.
    let cross_signed = second.sign(&valid_claims());
    assert_eq!(
        invalid_reason(&bearer(&verifier, &cross_signed).await),
        InvalidReason::UnknownKey
    );
}

#[tokio::test]
async fn raw_token_never_appears_in_debug_output() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let valid = key.sign(&valid_claims());
    let expired = key.sign(&claims_with(json!({"exp": NOW - 3600})));

    for token in [valid, expired] {
        let outcome = bearer(&verifier, &token).await;
        let signature = token.rsplit('.').next().unwrap();
        let debug = format!("{outcome:?}");
        assert!(!debug.contains(&token));
        assert!(!debug.contains(signature));
    }
}

#[tokio::test]
async fn invalid_token_builds_www_authenticate() {
    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    let token = key.sign(&claims_with(json!({"aud": "say \"hi\"\\\n"})));

    let TokenOutcome::Invalid(invalid) = bearer(&verifier, &token).await else {
        panic!("expected an invalid token")
    };

    assert_eq!(
        invalid.www_authenticate(),
        r#"Bearer error="invalid_token", error_description="token audience say \"hi\"\\? is not accepted""#
    );
}

#[tokio::test]
async fn upstream_headers_copy_claims_and_strip_the_token() {
    let key = TestKey::rsa("rsa-a");
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    let mut config = provider(&[key.jwk()]);
    config.claim_to_headers = vec![
        ClaimToHeader {
            claim: "sub".to_owned(),
            header: "X-Jwt-Sub".to_owned(),
        },
        ClaimToHeader {
            claim: "tenant".to_owned(),
            header: "x-jwt-tenant".to_owned(),
        },
    ];
    let verifier = verifier_for(vec![config], &clock);
    let token = key.sign(&valid_claims());

    let headers = HashMap::from([
        ("authorization".to_owned(), format!("Bearer {token}")),
        ("x-jwt-tenant".to_owned(), "forged".to_owned()),
    ]);
    let request = RequestView::new(&headers, "/");
    let outcome = verifier.authenticate(&request).await;
    let changes = verifier.upstream_headers(&outcome, &request);

    assert_eq!(
        changes.set,
        vec![("x-jwt-sub".to_owned(), "alice".to_owned())]
    );
    assert_eq!(
        changes.remove,
        vec!["x-jwt-tenant".to_owned(), "authorization".to_owned()]
    );
    assert!(changes.remove_query_parameters.is_empty());

    let anonymous = HashMap::from([("x-jwt-sub".to_owned(), "admin".to_owned())]);
    let request = RequestView::new(&anonymous, "/");
    let changes = verifier.upstream_headers(&TokenOutcome::NoToken, &request);
    assert!(changes.set.is_empty());
    assert_eq!(
        changes.remove,
        vec!["x-jwt-sub".to_owned(), "x-jwt-tenant".to_owned()]
    );
}

#[tokio::test]
async fn upstream_headers_strip_cookie_and_query_tokens() {
    let key = TestKey::rsa("rsa-a");
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    let mut config = provider(&[key.jwk()]);
    config.locations = vec![
        TokenLocation::Cookie {
            name: "session".to_owned(),
        },
        TokenLocation::QueryParameter {
            name: "jwt".to_owned(),
        },
    ];
    let verifier = verifier_for(vec![config], &clock);
    let token = key.sign(&valid_claims());

    let headers = HashMap::from([("cookie".to_owned(), format!("theme=dark; session={token}"))]);
    let path = format!("/?jwt={token}");
    let request = RequestView::new(&headers, &path);
    let outcome = verifier.authenticate(&request).await;
    let changes = verifier.upstream_headers(&outcome, &request);

    assert_eq!(
        changes.set,
        vec![("cookie".to_owned(), "theme=dark".to_owned())]
    );
    assert_eq!(changes.remove_query_parameters, vec!["jwt".to_owned()]);
    assert!(changes.remove.is_empty());
}

#[tokio::test]
async fn forwarded_token_is_kept() {
    let key = TestKey::rsa("rsa-a");
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    let mut config = provider(&[key.jwk()]);
    config.forward = true;
    let verifier = verifier_for(vec![config], &clock);
    let headers = HashMap::from([(
        "authorization".to_owned(),
        format!("Bearer {}", key.sign(&valid_claims())),
    )]);
    let request = RequestView::new(&headers, "/");

    let outcome = verifier.authenticate(&request).await;

    assert_eq!(
        verifier.upstream_headers(&outcome, &request),
        portcullis_jwt::UpstreamHeaders::default()
    );
}

#[test]
fn verifier_and_its_future_can_cross_threads() {
    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    fn assert_send<T: Send>(_: T) {}

    let key = TestKey::rsa("rsa-a");
    let (verifier, _clock) = verifier(&[key.jwk()]);
    assert_send_sync(&verifier);
    let headers = HashMap::new();
    let request = RequestView::new(&headers, "/");
    assert_send(verifier.authenticate(&request));
}

#[derive(Default)]
struct RecordingObserver {
    checks: Mutex<Vec<(String, bool)>>,
}

impl RecordingObserver {
    fn checks(&self) -> Vec<(String, bool)> {
        self.checks.lock().unwrap().clone()
    }
}

impl JwtObserver for RecordingObserver {
    fn token_checked(&self, _provider: Option<&str>, outcome: &str, from_cache: bool) {
        self.checks
            .lock()
            .unwrap()
            .push((outcome.to_owned(), from_cache));
    }
}

fn secret_file(contents: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(contents).unwrap();
    file
}

fn base64_text(text: &str) -> String {
    base64_bytes(text.as_bytes())
}

fn base64_bytes(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
