//! Runs the Rego unit tests of the repository's bundles with regorus, so they run in
//! `cargo test` even where OPA is not installed.

mod common;

use common::{repository_bundle, write_files};
use portcullis_policy::{RegoTestOutcome, load_bundle, run_rego_tests};

/// Counts `test_` rule heads in the bundle's test files, as a check that the runner found
/// every test rather than trusting its own listing.
fn count_test_rules(bundle: &portcullis_policy::Bundle) -> usize {
    bundle
        .modules()
        .iter()
        .filter(|module| module.is_test())
        .flat_map(|module| module.source().lines())
        .filter(|line| line.starts_with("test_"))
        .count()
}

fn failures(outcomes: &[RegoTestOutcome]) -> Vec<String> {
    outcomes
        .iter()
        .filter(|outcome| !outcome.passed())
        .map(|outcome| format!("{}: {:?}", outcome.rule, outcome.result))
        .collect()
}

#[test]
fn example_bundle_rego_tests_pass() {
    let bundle = load_bundle(&repository_bundle("example")).unwrap();

    let outcomes = run_rego_tests(&bundle, false).expect("tests compile");

    assert_eq!(outcomes.len(), count_test_rules(&bundle));
    assert!(outcomes.len() >= 15, "only {} tests found", outcomes.len());
    assert_eq!(failures(&outcomes), Vec::<String>::new());
    assert!(
        outcomes
            .iter()
            .any(|outcome| outcome.rule == "data.envoy.authz_test.test_public_get_is_allowed")
    );
}

#[test]
fn default_bundle_rego_tests_pass() {
    let bundle = load_bundle(&repository_bundle("default")).unwrap();

    let outcomes = run_rego_tests(&bundle, false).expect("tests compile");

    assert_eq!(outcomes.len(), count_test_rules(&bundle));
    assert!(!outcomes.is_empty());
    assert_eq!(failures(&outcomes), Vec::<String>::new());
}

#[test]
fn failing_and_undefined_rego_tests_are_reported() {
    let folder = tempfile::tempdir().unwrap();
    write_files(
        folder.path(),
        &[
            ("p/policy.rego", "package p\n\nallow if input.ok\n"),
            (
                "p/policy_test.rego",
                "package p_test\n\nimport data.p\n\n\
                 test_passes if p.allow with input as {\"ok\": true}\n\n\
                 test_undefined if p.allow with input as {}\n\n\
                 test_false := false\n",
            ),
        ],
    );
    let bundle = load_bundle(folder.path()).unwrap();

    let outcomes = run_rego_tests(&bundle, false).unwrap();

    let results: Vec<(&str, &Result<(), String>)> = outcomes
        .iter()
        .map(|outcome| (outcome.rule.as_str(), &outcome.result))
        .collect();
    assert_eq!(
        results,
        vec![
            (
                "data.p_test.test_false",
                &Err("evaluated to false".to_string())
            ),
            ("data.p_test.test_passes", &Ok(())),
            ("data.p_test.test_undefined", &Err("undefined".to_string())),
        ]
    );
}
