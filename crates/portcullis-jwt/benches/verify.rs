//! Cost of `Verifier::authenticate` for one bearer token per signature algorithm, with the
//! verified-token cache off (every call checks the signature) and on (the same token repeated,
//! so every call after the first is a cache hit).
//!
//! Keys are the test-only keys in `tests/fixtures/keys`, published through an inline JWKS, so no
//! network is involved. Run with `cargo bench -p portcullis-jwt --bench verify`; add
//! `-- --quick` for a shorter, less precise run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use portcullis_jwt::{
    KeySource, ProviderConfig, RequestView, TokenOutcome, Verifier, VerifierConfig,
};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

const ISSUER: &str = "https://issuer.bench";
const AUDIENCE: &str = "orders";
/// Lifetime of the benchmark tokens, far longer than any benchmark run.
const TOKEN_LIFETIME_SECONDS: u64 = 3600;

/// One benchmarked algorithm: its name in the JWS header, the key file and the key type.
struct BenchKey {
    algorithm: Algorithm,
    name: &'static str,
    file: &'static str,
}

const BENCH_KEYS: &[BenchKey] = &[
    BenchKey {
        algorithm: Algorithm::RS256,
        name: "RS256",
        file: "rsa-a",
    },
    BenchKey {
        algorithm: Algorithm::PS256,
        name: "PS256",
        file: "rsa-a",
    },
    BenchKey {
        algorithm: Algorithm::ES256,
        name: "ES256",
        file: "p256-a",
    },
    BenchKey {
        algorithm: Algorithm::ES384,
        name: "ES384",
        file: "p384-a",
    },
    BenchKey {
        algorithm: Algorithm::EdDSA,
        name: "EdDSA",
        file: "ed25519-a",
    },
];

/// A signed token and the public JWK that verifies it.
struct SignedToken {
    name: &'static str,
    token: String,
    jwk: Value,
}

fn key_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(format!("{file}.pem"))
}

fn encoding_key(key: &BenchKey) -> EncodingKey {
    let path = key_path(key.file);
    let pem = std::fs::read(&path)
        .unwrap_or_else(|error| panic!("reading {} failed: {error}", path.display()));
    let parsed = match key.algorithm {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    };
    parsed.unwrap_or_else(|error| panic!("parsing {} failed: {error}", path.display()))
}

fn encode_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// Signs a token valid for [`TOKEN_LIFETIME_SECONDS`] from now, with the algorithm name as kid.
fn sign_token(key: &BenchKey) -> SignedToken {
    let encoding = encoding_key(key);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the system clock is after 1970")
        .as_secs();
    let header = json!({"alg": key.name, "kid": key.name, "typ": "JWT"});
    let claims = json!({
        "iss": ISSUER,
        "sub": "bench-subject",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + TOKEN_LIFETIME_SECONDS,
    });
    let signing_input = format!("{}.{}", encode_json(&header), encode_json(&claims));
    let signature = jsonwebtoken::crypto::sign(signing_input.as_bytes(), &encoding, key.algorithm)
        .unwrap_or_else(|error| panic!("signing a {} token failed: {error}", key.name));

    let jwk = Jwk::from_encoding_key(&encoding, key.algorithm)
        .unwrap_or_else(|error| panic!("deriving the {} JWK failed: {error}", key.name));
    let mut jwk = serde_json::to_value(jwk).expect("a JWK serializes to JSON");
    jwk["kid"] = json!(key.name);
    jwk["use"] = json!("sig");
    SignedToken {
        name: key.name,
        token: format!("{signing_input}.{signature}"),
        jwk,
    }
}

/// Builds a verifier for [`ISSUER`] with every benchmark key in an inline JWKS.
fn verifier(tokens: &[SignedToken], cache_entries: usize) -> Verifier {
    let keys: Vec<&Value> = tokens.iter().map(|token| &token.jwk).collect();
    let jwks = json!({ "keys": keys }).to_string();
    let mut provider = ProviderConfig::new("bench", ISSUER, KeySource::Inline { jwks });
    provider.audiences = vec![AUDIENCE.to_owned()];
    let mut config = VerifierConfig {
        providers: vec![provider],
        ..Default::default()
    };
    config.token_cache.max_entries = cache_entries;
    Verifier::new(config).expect("the benchmark verifier configuration is valid")
}

fn bearer_headers(token: &str) -> HashMap<String, String> {
    HashMap::from([("authorization".to_owned(), format!("Bearer {token}"))])
}

/// Panics unless `token` verifies, so that a benchmark never measures a rejection path.
fn assert_valid(runtime: &Runtime, verifier: &Verifier, token: &SignedToken) {
    let headers = bearer_headers(&token.token);
    let outcome = runtime.block_on(verifier.authenticate(&RequestView::new(&headers, "/")));
    assert!(
        matches!(outcome, TokenOutcome::Valid(_)),
        "the {} benchmark token must verify, got {outcome:?}",
        token.name
    );
}

fn bench_authenticate(criterion: &mut Criterion) {
    let runtime = Runtime::new().expect("a Tokio runtime starts");
    let tokens: Vec<SignedToken> = BENCH_KEYS.iter().map(sign_token).collect();
    let configurations = [
        ("cache_off", 0),
        ("cache_hit", portcullis_jwt::DEFAULT_TOKEN_CACHE_ENTRIES),
    ];

    for (label, cache_entries) in configurations {
        let verifier = verifier(&tokens, cache_entries);
        runtime.block_on(verifier.start());
        let mut group = criterion.benchmark_group(format!("authenticate/{label}"));
        for token in &tokens {
            // The first call also fills the cache in the `cache_hit` group.
            assert_valid(&runtime, &verifier, token);
            let headers = bearer_headers(&token.token);
            group.bench_with_input(
                BenchmarkId::from_parameter(token.name),
                &headers,
                |bencher, headers| {
                    bencher.to_async(&runtime).iter(|| async {
                        let outcome = verifier.authenticate(&RequestView::new(headers, "/")).await;
                        std::hint::black_box(outcome)
                    });
                },
            );
        }
        group.finish();
    }
}

criterion_group!(benches, bench_authenticate);
criterion_main!(benches);
