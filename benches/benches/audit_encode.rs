//! Micro-benchmarks of turning one decision event into its audit record, in memory, as the
//! audit pipeline and the file sink do for every check. `serialize` is the JSON serialisation
//! of the event, `seal` chains those bytes and hashes them with SHA-256
//! (`portcullis_audit::chain::seal`), and `serialize_and_seal` does both. Writing and fsyncing
//! are not measured.
//!
//! The events are the ones `Authorizer::check` builds for each request of the mix, with the
//! example policy, no token verification and the default event options (no headers copied).
//! Each measured call appends to the same chain, so the sequence grows as in a running
//! instance. The sealed records are dropped.
//!
//!     cargo bench -p portcullis-bench --bench audit_encode

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis_audit::chain::{ChainHead, seal};
use portcullis_audit::{DecisionEvent, NullSink};
use portcullis_authz::service::{Authorizer, NoObserver};
use portcullis_bench::requests::read_mix;
use portcullis_policy::{Policy, PolicyStore, load_bundle};
use tokio::runtime::Runtime;

/// Instance id of the chain, a pod name of typical length.
const INSTANCE_ID: &str = "orders-7d9f8b6c5d-x2k4p";

fn workspace_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// Returns an authorizer with the example policy that records into a sink that keeps nothing.
fn build_authorizer() -> Authorizer {
    let bundle =
        load_bundle(&workspace_path("policies/example")).expect("the example bundle loads");
    let policy =
        Policy::compile(&bundle, "envoy/authz/allow").expect("the example bundle compiles");
    Authorizer::new(
        Arc::new(PolicyStore::new(policy)),
        Arc::new(NullSink),
        Arc::new(NoObserver),
        Duration::from_secs(1),
    )
}

/// Serialises `event`, appends it to the chain that ends at `head` and returns the record's
/// length in bytes.
fn append(instance_id: &Arc<str>, head: &mut ChainHead, event: &DecisionEvent) -> usize {
    let payload = serde_json::to_vec(event).expect("a decision event serialises");
    let (record, next) = seal(instance_id, head, &payload).expect("the event is a JSON object");
    *head = next;
    record.bytes.len()
}

fn audit_encode(criterion: &mut Criterion) {
    let runtime = Runtime::new().expect("a Tokio runtime starts");
    let authorizer = build_authorizer();
    let mix = read_mix(&workspace_path("benches/requests"))
        .expect("the request mix in benches/requests loads");
    let instance_id: Arc<str> = Arc::from(INSTANCE_ID);

    for entry in &mix {
        let event = runtime
            .block_on(authorizer.check(entry.request.clone()))
            .event;
        let payload = serde_json::to_vec(&event).expect("a decision event serialises");
        let mut group = criterion.benchmark_group(format!("audit_{}", entry.name));

        group.bench_function("serialize", |bencher| {
            bencher.iter(|| {
                serde_json::to_vec(black_box(&event)).expect("a decision event serialises")
            })
        });

        let mut head = ChainHead::genesis();
        group.bench_function("seal", |bencher| {
            bencher.iter(|| {
                let (record, next) = seal(&instance_id, &head, black_box(&payload))
                    .expect("the event is a JSON object");
                head = next;
                record
            })
        });

        let mut head = ChainHead::genesis();
        group.bench_function("serialize_and_seal", |bencher| {
            bencher.iter(|| append(&instance_id, &mut head, black_box(&event)))
        });

        group.finish();
    }
}

criterion_group!(benches, audit_encode);
criterion_main!(benches);
