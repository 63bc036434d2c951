//! Micro-benchmarks of the steps of one check that portcullis adds to the gRPC call: building
//! the policy input from a CheckRequest and evaluating the example policy on it.
//!
//!     cargo bench -p portcullis-bench --bench check_path

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis_authz::input::build_input;
use portcullis_bench::requests::read_mix;
use portcullis_policy::{Policy, load_bundle};

fn workspace_path(relative: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn check_path(criterion: &mut Criterion) {
    let mix = read_mix(&workspace_path("benches/requests"))
        .expect("the request mix in benches/requests loads");
    let bundle =
        load_bundle(&workspace_path("policies/example")).expect("the example bundle loads");
    let policy =
        Policy::compile(&bundle, "envoy/authz/allow").expect("the example bundle compiles");

    for entry in &mix {
        let mut group = criterion.benchmark_group(entry.name.as_str());

        group.bench_function("build_input", |bencher| {
            bencher.iter(|| {
                build_input(black_box(&entry.request)).expect("the mix has well-formed bodies")
            })
        });

        let input = build_input(&entry.request).expect("the mix has well-formed bodies");
        group.bench_function("evaluate", |bencher| {
            bencher.iter(|| {
                policy
                    .evaluate(black_box(input.document.clone()))
                    .expect("the example policy evaluates")
            })
        });

        group.bench_function("build_input_and_evaluate", |bencher| {
            bencher.iter(|| {
                let input =
                    build_input(black_box(&entry.request)).expect("the mix has well-formed bodies");
                policy
                    .evaluate(input.document)
                    .expect("the example policy evaluates")
            })
        });

        group.finish();
    }
}

criterion_group!(benches, check_path);
criterion_main!(benches);
