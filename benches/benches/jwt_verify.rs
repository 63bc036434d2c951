//! Micro-benchmarks of verifying the bearer token of the JWT load scenarios: an RS256 token
//! signed with the DEV-ONLY key in `benches/jwt/`, checked by `portcullis_jwt::Verifier` against
//! `benches/jwt/jwks.dev-only.json` with the provider settings those scenarios configure.
//!
//! - `cache_off`: the verified-token cache is disabled (`max_entries` 0), so every call decodes
//!   the token, checks the RS256 signature and the claims.
//! - `cache_hit`: the default cache, filled by one call before measuring, so every call finds
//!   the token's SHA-256 in the cache and returns the cached identity.
//!
//! Both read the token from the `authorization` header of a request of the mix, as a check does.
//!
//!     cargo bench -p portcullis-bench --bench jwt_verify

use std::collections::HashMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis_bench::jwt;
use portcullis_bench::requests::read_mix;
use portcullis_jwt::{
    KeySource, ProviderConfig, RequestView, SignatureAlgorithm, TokenOutcome, Verifier,
    VerifierConfig,
};
use tokio::runtime::Runtime;

/// The request of the mix whose headers carry the token.
const REQUEST: &str = "public-get";

fn workspace_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// Builds a verifier with the provider of the JWT load scenarios and a token cache of
/// `cache_entries` entries.
fn build_verifier(cache_entries: usize) -> Verifier {
    let jwks = workspace_path("benches/jwt/jwks.dev-only.json");
    let mut provider = ProviderConfig::new("bench", jwt::ISSUER, KeySource::File { path: jwks });
    provider.audiences = vec![jwt::AUDIENCE.to_owned()];
    provider.algorithms = vec![SignatureAlgorithm::RS256];
    let mut config = VerifierConfig {
        providers: vec![provider],
        ..Default::default()
    };
    config.token_cache.max_entries = cache_entries;
    Verifier::new(config).expect("the benchmark provider configuration is valid")
}

/// Returns the HTTP headers and path of the mix request [`REQUEST`] with the bearer token added.
fn request_with_token(token: &str) -> (HashMap<String, String>, String) {
    let mix = read_mix(&workspace_path("benches/requests"))
        .expect("the request mix in benches/requests loads");
    let entry = mix
        .iter()
        .find(|entry| entry.name == REQUEST)
        .expect("the mix contains public-get");
    let with_token = jwt::with_bearer(std::slice::from_ref(&entry.request), token);
    let http = with_token[0]
        .attributes
        .as_ref()
        .and_then(|attributes| attributes.request.as_ref())
        .and_then(|request| request.http.as_ref())
        .expect("the mix request is an HTTP request");
    (http.headers.clone(), http.path.clone())
}

fn jwt_verify(criterion: &mut Criterion) {
    let runtime = Runtime::new().expect("a Tokio runtime starts");
    let issued_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the system clock is after 1970")
        .as_secs();
    let token = jwt::sign_token(
        &workspace_path("benches/jwt/rs256-key.dev-only.pem"),
        issued_at,
    )
    .expect("the DEV-ONLY key signs the token");
    let (headers, path) = request_with_token(&token);
    let request = RequestView::new(&headers, &path);

    let mut group = criterion.benchmark_group("jwt_verify_rs256");
    let configurations = [
        ("cache_off", 0),
        ("cache_hit", portcullis_jwt::DEFAULT_TOKEN_CACHE_ENTRIES),
    ];
    for (name, cache_entries) in configurations {
        let verifier = build_verifier(cache_entries);
        runtime.block_on(verifier.start());

        // This call fills the cache in `cache_hit`, and the assert keeps a rejected token from
        // being measured.
        let outcome = runtime.block_on(verifier.authenticate(&request));
        assert!(
            matches!(&outcome, TokenOutcome::Valid(identity) if identity.subject.as_deref() == Some(jwt::SUBJECT)),
            "the benchmark token must verify, got {outcome:?}"
        );

        group.bench_function(name, |bencher| {
            bencher
                .to_async(&runtime)
                .iter(|| verifier.authenticate(black_box(&request)))
        });
    }
    group.finish();
}

criterion_group!(benches, jwt_verify);
criterion_main!(benches);
