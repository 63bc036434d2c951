//! Remote JWKS behaviour against a server on 127.0.0.1 that the tests control: rotation under
//! load, outages, garbage responses, the unknown-`kid` rate limit, staleness and discovery.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{AUDIENCE, ISSUER, JwksServer, NOW, Reply, TestKey, claims_now, jwks, valid_claims};
use jsonwebtoken::Algorithm;
use portcullis_jwt::{
    FetchError, InvalidReason, KeySource, ManualClock, ProviderConfig, RequestView, TokenOutcome,
    Verifier, VerifierConfig,
};
use serde_json::json;

/// Returns a remote provider with short intervals, so that refreshes happen within a test.
fn remote_provider(server: &JwksServer) -> ProviderConfig {
    let mut provider = ProviderConfig::new(
        "remote",
        ISSUER,
        KeySource::RemoteJwks {
            uri: server.jwks_url(),
        },
    );
    provider.audiences = vec![AUDIENCE.to_owned()];
    provider.jwks.allow_http_loopback = true;
    provider.jwks.fetch_timeout = Duration::from_millis(500);
    provider.jwks.default_refresh_interval = Duration::from_millis(100);
    provider.jwks.min_refresh_interval = Duration::from_millis(50);
    provider.jwks.initial_backoff = Duration::from_millis(50);
    provider.jwks.max_backoff = Duration::from_millis(100);
    provider.jwks.unknown_kid_refetch_interval = Duration::from_millis(100);
    provider
}

fn build(provider: ProviderConfig, clock: Option<Arc<ManualClock>>) -> Verifier {
    let mut builder = Verifier::builder(VerifierConfig {
        providers: vec![provider],
        ..Default::default()
    });
    if let Some(clock) = clock {
        builder = builder.clock(clock);
    }
    builder.build().expect("configuration is valid")
}

async fn bearer(verifier: &Verifier, token: &str) -> TokenOutcome {
    let headers = HashMap::from([("authorization".to_owned(), format!("Bearer {token}"))]);
    verifier
        .authenticate(&RequestView::new(&headers, "/"))
        .await
}

fn reason(outcome: &TokenOutcome) -> Option<InvalidReason> {
    match outcome {
        TokenOutcome::Invalid(invalid) => Some(invalid.reason),
        _ => None,
    }
}

/// Waits until the server has served `count` more JWKS requests, for at most `limit`.
async fn wait_for_fetches(server: &JwksServer, count: usize, limit: Duration) {
    let target = server.jwks_fetches() + count;
    let deadline = Instant::now() + limit;
    while server.jwks_fetches() < target {
        assert!(
            Instant::now() < deadline,
            "expected {count} more JWKS fetches within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Signs claims valid now with a unique `jti`, so that every token is verified afresh.
fn fresh_token(key: &TestKey, serial: usize) -> String {
    let mut claims = claims_now(ISSUER, "alice");
    claims["jti"] = json!(serial);
    key.sign(&claims)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_keeps_published_keys_verifying() {
    let key_a = TestKey::load("p256-a", "key-a", Algorithm::ES256);
    let key_b = TestKey::load("p256-b", "key-b", Algorithm::ES256);
    let key_c = TestKey::load("ed25519-a", "key-c", Algorithm::EdDSA);
    let server = JwksServer::start(Reply::ok(jwks(&[key_a.jwk()]))).await;
    let verifier = build(remote_provider(&server), None);
    let status = verifier.start().await;
    assert!(status[0].usable, "{status:?}");

    let signer = Arc::new(Mutex::new(key_a.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let serial = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (verifier, signer, stop, serial) = (
            verifier.clone(),
            signer.clone(),
            stop.clone(),
            serial.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut verified = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let key = signer.lock().unwrap().clone();
                let token = fresh_token(&key, serial.fetch_add(1, Ordering::SeqCst));
                match bearer(&verifier, &token).await {
                    TokenOutcome::Valid(_) => verified += 1,
                    other => failures.push(format!("{}: {other:?}", key.kid)),
                }
                // Repeated tokens must also stay valid, now from the cache.
                if !matches!(bearer(&verifier, &token).await, TokenOutcome::Valid(_)) {
                    failures.push(format!("{}: cached token rejected", key.kid));
                }
                // Verification with cached keys never waits, so let the other tasks run.
                tokio::task::yield_now().await;
            }
            (verified, failures)
        }));
    }

    // Publish B next to A, then sign with B at once: the first B tokens name an unknown kid.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.set_jwks(jwks(&[key_a.jwk(), key_b.jwk()]));
    *signer.lock().unwrap() = key_b.clone();
    // Remove A once nothing signs with it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.set_jwks(jwks(&[key_b.jwk()]));
    // Publish C (another key type) and switch to it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.set_jwks(jwks(&[key_b.jwk(), key_c.jwk()]));
    *signer.lock().unwrap() = key_c.clone();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::SeqCst);

    let mut total = 0;
    for worker in workers {
        let (verified, failures) = tokio::time::timeout(Duration::from_secs(30), worker)
            .await
            .unwrap()
            .unwrap();
        assert!(failures.is_empty(), "failed verifications: {failures:?}");
        total += verified;
    }
    assert!(total >= 20, "only {total} tokens verified under load");

    // Key A is gone: its tokens no longer verify.
    let old = fresh_token(&key_a, usize::MAX);
    assert_eq!(
        reason(&bearer(&verifier, &old).await),
        Some(InvalidReason::UnknownKey)
    );
}

#[tokio::test]
async fn failed_refreshes_keep_the_last_good_keys() {
    let key = TestKey::load("p256-a", "key-a", Algorithm::ES256);
    let good_jwks = jwks(&[key.jwk()]);
    let server = JwksServer::start(Reply::ok(good_jwks.clone())).await;
    let mut provider = remote_provider(&server);
    provider.jwks.max_response_bytes = 4096;
    let verifier = build(provider, None);
    verifier.start().await;
    let mut serial = 0;

    let padding: Vec<_> = (0..200)
        .map(|index| json!({"kty": "oct", "kid": format!("pad-{index}"), "k": "AAAA"}))
        .collect();
    let mut oversized_keys = vec![key.jwk()];
    oversized_keys.extend(padding);
    let failures = [
        (
            "HTTP 500",
            Reply {
                status: 500,
                ..Reply::ok("internal error".to_owned())
            },
        ),
        ("garbage", Reply::ok("<html>not json</html>".to_owned())),
        ("empty key set", Reply::ok(r#"{"keys": []}"#.to_owned())),
        (
            "only skipped keys",
            Reply::ok(jwks(&[
                json!({"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}),
            ])),
        ),
        ("oversized body", Reply::ok(jwks(&oversized_keys))),
        (
            "timeout",
            Reply {
                delay: Duration::from_secs(2),
                ..Reply::ok(good_jwks.clone())
            },
        ),
    ];
    for (name, reply) in failures {
        server.set_reply(reply);
        wait_for_fetches(&server, 2, Duration::from_secs(10)).await;
        serial += 1;
        let outcome = bearer(&verifier, &fresh_token(&key, serial)).await;
        assert!(
            matches!(outcome, TokenOutcome::Valid(_)),
            "after {name}: {outcome:?}"
        );
        let status = &verifier.status()[0];
        assert!(status.consecutive_failures >= 1, "after {name}: {status:?}");
        assert!(status.last_error.is_some(), "after {name}: {status:?}");
    }

    server.set_jwks(good_jwks);
    let deadline = Instant::now() + Duration::from_secs(10);
    while verifier.status()[0].consecutive_failures != 0 {
        assert!(
            Instant::now() < deadline,
            "refresh did not recover: {:?}",
            verifier.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(verifier.status()[0].last_error, None);
}

#[tokio::test]
async fn fetch_errors_are_classified() {
    let key = TestKey::load("p256-a", "key-a", Algorithm::ES256);
    let server = JwksServer::start(Reply {
        status: 503,
        ..Reply::ok(String::new())
    })
    .await;
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    let verifier = build(remote_provider(&server), Some(clock.clone()));

    let status = verifier.start().await;
    assert!(!status[0].usable);
    assert_eq!(
        status[0].last_error,
        Some(FetchError::Status {
            url: server.jwks_url(),
            status: 503
        })
    );

    // No keys at all: the request triggers a fetch, which fails again.
    let outcome = bearer(&verifier, &key.sign(&valid_claims())).await;
    assert_eq!(reason(&outcome), Some(InvalidReason::KeysUnavailable));
    if let TokenOutcome::Invalid(invalid) = &outcome {
        assert!(!invalid.reason.is_caller_fault());
    }

    // Once the server recovers, the next unknown-key fetch after the interval loads the keys.
    server.set_jwks(jwks(&[key.jwk()]));
    clock.advance(Duration::from_millis(100));
    assert!(matches!(
        bearer(&verifier, &key.sign(&valid_claims())).await,
        TokenOutcome::Valid(_)
    ));
}

#[tokio::test]
async fn unknown_kid_flood_is_rate_limited_and_coalesced() {
    let published = TestKey::load("p256-a", "key-a", Algorithm::ES256);
    let server = JwksServer::start(Reply::ok(jwks(&[published.jwk()]))).await;
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    let mut provider = remote_provider(&server);
    provider.jwks.unknown_kid_refetch_interval = Duration::from_secs(10);
    provider.jwks.default_refresh_interval = Duration::from_secs(3600);
    let verifier = build(provider, Some(clock.clone()));
    verifier.start().await;
    assert_eq!(server.jwks_fetches(), 1);

    // A slow response keeps the first fetch in flight while the others arrive.
    server.set_reply(Reply {
        delay: Duration::from_millis(200),
        ..Reply::ok(jwks(&[published.jwk()]))
    });
    let flood = |round: usize| {
        let verifier = verifier.clone();
        async move {
            let mut requests = Vec::new();
            for index in 0..50 {
                let verifier = verifier.clone();
                let forged = TestKey::load(
                    "p256-b",
                    &format!("unknown-{round}-{index}"),
                    Algorithm::ES256,
                );
                let token = forged.sign(&valid_claims());
                requests.push(tokio::spawn(async move { bearer(&verifier, &token).await }));
            }
            let mut reasons = Vec::new();
            for request in requests {
                reasons.push(reason(&request.await.unwrap()));
            }
            reasons
        }
    };

    let reasons = flood(1).await;
    assert!(
        reasons
            .iter()
            .all(|reason| *reason == Some(InvalidReason::UnknownKey)),
        "{reasons:?}"
    );
    assert_eq!(server.jwks_fetches(), 2);

    flood(2).await;
    clock.advance(Duration::from_secs(9));
    flood(3).await;
    assert_eq!(server.jwks_fetches(), 2);

    clock.advance(Duration::from_secs(1));
    flood(4).await;
    assert_eq!(server.jwks_fetches(), 3);
}

#[tokio::test]
async fn removed_key_invalidates_its_cached_tokens() {
    let key_a = TestKey::load("p256-a", "key-a", Algorithm::ES256);
    let key_b = TestKey::load("p256-b", "key-b", Algorithm::ES256);
    let server = JwksServer::start(Reply::ok(jwks(&[key_a.jwk()]))).await;
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    let mut provider = remote_provider(&server);
    provider.jwks.default_refresh_interval = Duration::from_secs(3600);
    let verifier = build(provider, Some(clock.clone()));
    verifier.start().await;

    let token_a = key_a.sign(&valid_claims());
    assert!(matches!(
        bearer(&verifier, &token_a).await,
        TokenOutcome::Valid(_)
    ));
    assert!(matches!(
        bearer(&verifier, &token_a).await,
        TokenOutcome::Valid(_)
    ));

    // The issuer replaces A with B; the first B token makes the verifier refetch.
    server.set_jwks(jwks(&[key_b.jwk()]));
    assert!(matches!(
        bearer(&verifier, &key_b.sign(&valid_claims())).await,
        TokenOutcome::Valid(_)
    ));

    let outcome = bearer(&verifier, &token_a).await;
    assert_eq!(reason(&outcome), Some(InvalidReason::UnknownKey));
}

#[tokio::test]
async fn stale_keys_expire_after_the_maximum_staleness() {
    let key = TestKey::load("p256-a", "key-a", Algorithm::ES256);
    let server = JwksServer::start(Reply::ok(jwks(&[key.jwk()]))).await;
    let clock = Arc::new(ManualClock::at_unix_seconds(NOW));
    let mut provider = remote_provider(&server);
    provider.jwks.max_staleness = Duration::from_secs(3600);
    let verifier = build(provider, Some(clock.clone()));
    verifier.start().await;
    server.set_reply(Reply {
        status: 500,
        ..Reply::ok(String::new())
    });

    let mut claims = valid_claims();
    claims["exp"] = json!(NOW + 7200);
    let token = key.sign(&claims);
    clock.advance(Duration::from_secs(3600));
    assert!(matches!(
        bearer(&verifier, &token).await,
        TokenOutcome::Valid(_)
    ));

    clock.advance(Duration::from_secs(1));
    assert_eq!(
        reason(&bearer(&verifier, &token).await),
        Some(InvalidReason::KeysUnavailable)
    );
    assert!(!verifier.status()[0].usable);
}

#[tokio::test]
async fn cache_control_max_age_sets_the_refresh_interval() {
    let key = TestKey::load("p256-a", "key-a", Algorithm::ES256);
    let frequent = JwksServer::start(Reply {
        cache_control: Some("max-age=0".to_owned()),
        ..Reply::ok(jwks(&[key.jwk()]))
    })
    .await;
    let rare = JwksServer::start(Reply {
        cache_control: Some("public, max-age=3600".to_owned()),
        ..Reply::ok(jwks(&[key.jwk()]))
    })
    .await;

    let mut frequent_provider = remote_provider(&frequent);
    frequent_provider.jwks.min_refresh_interval = Duration::from_millis(200);
    let mut rare_provider = remote_provider(&rare);
    rare_provider.jwks.max_refresh_interval = Duration::from_secs(7200);
    let frequent_verifier = build(frequent_provider, None);
    let rare_verifier = build(rare_provider, None);
    frequent_verifier.start().await;
    rare_verifier.start().await;

    tokio::time::sleep(Duration::from_millis(1100)).await;

    // max-age=0 is raised to the 200 ms minimum: about 5 more fetches in 1.1 s.
    assert!(
        (3..=8).contains(&frequent.jwks_fetches()),
        "{} fetches",
        frequent.jwks_fetches()
    );
    // max-age=3600 overrides the 100 ms default interval.
    assert_eq!(rare.jwks_fetches(), 1);
}

#[tokio::test]
async fn discovery_finds_the_jwks_and_checks_the_issuer() {
    let key = TestKey::load("p256-a", "key-a", Algorithm::ES256);
    let server = JwksServer::start(Reply::ok(jwks(&[key.jwk()]))).await;
    let issuer = format!("{}/realms/test", server.base_url());
    server.serve_discovery(&issuer);

    let mut provider = remote_provider(&server);
    provider.issuer = issuer.clone();
    provider.keys = Some(KeySource::OidcDiscovery);
    let verifier = build(provider, None);
    let status = verifier.start().await;
    assert!(status[0].usable, "{status:?}");
    assert_eq!(server.discovery_fetches(), 1);
    let token = key.sign(&claims_now(&issuer, "alice"));
    assert!(matches!(
        bearer(&verifier, &token).await,
        TokenOutcome::Valid(_)
    ));

    // A discovery document for another issuer is not trusted.
    let mut provider = remote_provider(&server);
    provider.name = "mismatch".to_owned();
    provider.issuer = format!("{}/realms/other", server.base_url());
    provider.keys = Some(KeySource::OidcDiscovery);
    let status = build(provider, None).start().await;
    assert!(!status[0].usable);
    assert_eq!(
        status[0].last_error,
        Some(FetchError::Discovery {
            url: format!(
                "{}/realms/other/.well-known/openid-configuration",
                server.base_url()
            ),
            reason: format!(
                "issuer is {issuer:?}, expected \"{}/realms/other\"",
                server.base_url()
            ),
        })
    );
}

#[tokio::test]
async fn dropping_the_verifier_stops_refreshing() {
    let key = TestKey::load("p256-a", "key-a", Algorithm::ES256);
    let server = JwksServer::start(Reply::ok(jwks(&[key.jwk()]))).await;
    let verifier = build(remote_provider(&server), None);
    verifier.start().await;
    wait_for_fetches(&server, 2, Duration::from_secs(5)).await;

    drop(verifier);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after_drop = server.jwks_fetches();
    tokio::time::sleep(Duration::from_millis(400)).await;

    assert_eq!(server.jwks_fetches(), after_drop);
}

#[tokio::test]
async fn https_jwks_is_trusted_through_the_extra_ca() {
    let key = TestKey::load("p256-a", "key-a", Algorithm::ES256);
    let server = JwksServer::start_tls(Reply::ok(jwks(&[key.jwk()]))).await;
    let mut provider = remote_provider(&server);
    provider.jwks.allow_http_loopback = false;

    let mut trusting = VerifierConfig {
        providers: vec![provider.clone()],
        ..Default::default()
    };
    trusting.http.extra_ca_file = Some(common::fixture_path("tls/ca.pem"));
    let verifier = Verifier::new(trusting).expect("configuration is valid");
    let status = verifier.start().await;
    assert!(status[0].usable, "{status:?}");
    let token = key.sign(&claims_now(ISSUER, "alice"));
    assert!(matches!(
        bearer(&verifier, &token).await,
        TokenOutcome::Valid(_)
    ));

    // Without the test CA, the server certificate is not trusted and no key is loaded.
    let status = build(provider, None).start().await;
    assert!(!status[0].usable);
    match &status[0].last_error {
        Some(FetchError::Request { url, .. }) => assert_eq!(url, &server.jwks_url()),
        other => panic!("expected a request error, got {other:?}"),
    }
}
