//! Cost of turning one decision event into a chained record: JSON encoding of the event,
//! then sealing it (chain members, SHA-256 of the body, `hash` member). This is the work the
//! audit writer does per check, without the spool write and fsync.
//!
//! Run with `cargo bench -p portcullis-audit --bench encode`; add `-- --quick` for a shorter,
//! less precise run.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis_audit::chain::{ChainHead, seal};
use portcullis_audit::{DecisionEvent, EventDecision, EventPolicy};

/// Builds an event the size of a typical allowed check with an identity and trace context.
fn event() -> DecisionEvent {
    DecisionEvent {
        schema: DecisionEvent::SCHEMA,
        event_id: "0190b8a4-5d2e-7c3a-9f1e-2b7d4c6a8e10".to_owned(),
        decision_id: "0190b8a4-5d2e-7c3a-9f1e-2b7d4c6a8e11".to_owned(),
        time: "2026-12-04T19:42:58.123456Z".to_owned(),
        request: serde_json::json!({
            "request_id": "5f0c6f0e-6a8b-4b43-9a1a-1f1f6c1d2e3f",
            "method": "GET",
            "authority": "orders.shop.svc.cluster.local",
            "path": "/api/v1/orders/12345",
            "source_address": "10.0.3.17:51324",
            "source_principal": "spiffe://cluster.local/ns/shop/sa/frontend",
            "destination_address": "10.0.5.9:8080",
            "trace": {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
        }),
        identity: Some(serde_json::json!({
            "outcome": "valid",
            "provider": "keycloak",
            "issuer": "https://keycloak.example/realms/shop",
            "subject": "f1d7c3a0-1234-4c1e-9b8a-0123456789ab",
            "kid": "rsa-2026-01",
            "alg": "RS256",
            "token_fingerprint": "9f86d081884c7d65"
        })),
        decision: EventDecision { allowed: true, http_status: 200, reason: None },
        policy: EventPolicy {
            bundle_revision: "2026-12-01.3".to_owned(),
            bundle_digest: "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae".to_owned(),
            decision_path: "envoy/authz/allow".to_owned(),
        },
        latency_us: 38,
        amends: None,
    }
}

fn encode(criterion: &mut Criterion) {
    let event = event();
    let instance: Arc<str> = Arc::from("orders-7d9f8c6b5-x2x4k");
    let mut head = ChainHead::genesis();

    criterion.bench_function("encode_and_seal_event", |bencher| {
        bencher.iter(|| {
            let payload = serde_json::to_vec(&event).expect("the event encodes");
            let (record, next) = seal(&instance, &head, &payload).expect("the payload is an object");
            head = next;
            record
        })
    });

    let payload = serde_json::to_vec(&event).expect("the event encodes");
    let mut head = ChainHead::genesis();
    criterion.bench_function("seal_encoded_event", |bencher| {
        bencher.iter(|| {
            let (record, next) = seal(&instance, &head, &payload).expect("the payload is an object");
            head = next;
            record
        })
    });
}

criterion_group!(benches, encode);
criterion_main!(benches);
