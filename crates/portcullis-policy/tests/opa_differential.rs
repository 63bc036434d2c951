//! Differential tests against the real OPA binary: the example bundle must decide every
//! input in `policies/example/testdata/inputs/` exactly as `opa eval` does.
//!
//! The binary is found through `PORTCULLIS_OPA`, then `opa` on `PATH`, then
//! `$HOME/.cache/portcullis/bin/opa`. Without it the tests print `SKIPPED` and pass, unless
//! `PORTCULLIS_REQUIRE_PEERS=1` is set, which makes a missing binary a failure.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::repository_bundle;
use portcullis_policy::{Policy, load_bundle};
use serde_json::Value as JsonValue;

const INSTALL_HINT: &str = "install it with `GOBIN=$HOME/.cache/portcullis/bin go install \
     github.com/open-policy-agent/opa@v1.22.4` or set PORTCULLIS_OPA";

const QUERY: &str = "data.envoy.authz.allow";

/// Returns the OPA binary, or `None` after printing why the test is skipped.
fn find_opa(test: &str) -> Option<PathBuf> {
    if let Some(configured) = std::env::var_os("PORTCULLIS_OPA") {
        let configured = PathBuf::from(configured);
        assert!(
            configured.is_file(),
            "PORTCULLIS_OPA={} is not a file",
            configured.display()
        );
        return Some(configured);
    }

    let search_path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&search_path)
        .map(|folder| folder.join("opa"))
        .chain(
            std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".cache/portcullis/bin/opa")),
        )
        .find(|candidate| candidate.is_file());
    if found.is_some() {
        return found;
    }

    if std::env::var("PORTCULLIS_REQUIRE_PEERS").as_deref() == Ok("1") {
        panic!("{test}: opa binary not found and PORTCULLIS_REQUIRE_PEERS=1; {INSTALL_HINT}");
    }
    // Written to the real stderr, which the test harness does not capture, so the skip
    // shows in a normal `cargo test` run.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {test}: opa binary not found; {INSTALL_HINT}"
    );
    None
}

/// Evaluates `QUERY` with `opa eval`; `None` means undefined.
fn opa_eval(opa: &Path, bundle: &Path, input: &Path) -> Option<JsonValue> {
    let output = Command::new(opa)
        .args(["eval", "--format", "json", "--bundle"])
        .arg(bundle)
        .arg("--input")
        .arg(input)
        .arg(QUERY)
        .output()
        .expect("opa eval starts");
    assert!(
        output.status.success(),
        "opa eval failed for {}: {}",
        input.display(),
        String::from_utf8_lossy(&output.stderr)
    );

    let document: JsonValue = serde_json::from_slice(&output.stdout).expect("opa prints JSON");
    let value = document
        .get("result")?
        .get(0)?
        .get("expressions")?
        .get(0)?
        .get("value")?;
    Some(value.clone())
}

/// Evaluates `QUERY` with portcullis-policy; `None` means undefined.
fn portcullis_eval(policy: &Policy, input: &Path) -> Option<JsonValue> {
    let text = std::fs::read_to_string(input).expect("read input");
    let input = regorus::Value::from_json_str(&text).expect("input is JSON");

    let value = policy.evaluate(input).expect("evaluation succeeds");
    if value == regorus::Value::Undefined {
        return None;
    }
    Some(serde_json::to_value(&value).expect("decision converts to JSON"))
}

/// Numbers compare by value, because OPA and regorus may print `100` and `100.0`
/// differently for the same number.
fn normalize_numbers(value: JsonValue) -> JsonValue {
    match value {
        JsonValue::Number(number) => match number.as_f64() {
            Some(float) if float.fract() == 0.0 && float.abs() < 9.0e15 => {
                JsonValue::from(float as i64)
            }
            _ => JsonValue::Number(number),
        },
        JsonValue::Array(items) => {
            JsonValue::Array(items.into_iter().map(normalize_numbers).collect())
        }
        JsonValue::Object(fields) => JsonValue::Object(
            fields
                .into_iter()
                .map(|(key, field)| (key, normalize_numbers(field)))
                .collect(),
        ),
        other => other,
    }
}

fn input_files() -> Vec<PathBuf> {
    let folder = repository_bundle("example").join("testdata/inputs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
        .expect("inputs folder exists")
        .map(|entry| entry.expect("read inputs folder").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "json")
        })
        .collect();
    files.sort();
    files
}

#[test]
fn example_decisions_match_opa() {
    let Some(opa) = find_opa("example_decisions_match_opa") else {
        return;
    };
    let bundle_path = repository_bundle("example");
    let bundle = load_bundle(&bundle_path).expect("example bundle loads");
    let policy = Policy::compile(&bundle, "envoy/authz/allow").expect("example compiles");
    let inputs = input_files();
    assert!(inputs.len() >= 20, "only {} inputs", inputs.len());

    let mut mismatches = Vec::new();
    for input in &inputs {
        let expected = opa_eval(&opa, &bundle_path, input).map(normalize_numbers);
        let actual = portcullis_eval(&policy, input).map(normalize_numbers);
        if expected != actual {
            mismatches.push(format!(
                "{}:\n  opa:        {expected:?}\n  portcullis: {actual:?}",
                input.display()
            ));
        }
    }

    assert!(
        mismatches.is_empty(),
        "{} of {} inputs differ:\n{}",
        mismatches.len(),
        inputs.len(),
        mismatches.join("\n")
    );
}

#[test]
fn inputs_cover_allow_and_both_deny_statuses() {
    // Guards the fixture set itself: a differential test over inputs that all end the
    // same way would prove little.
    let bundle = load_bundle(&repository_bundle("example")).unwrap();
    let policy = Policy::compile(&bundle, "envoy/authz/allow").unwrap();

    let mut allowed = 0;
    let mut statuses = std::collections::BTreeSet::new();
    for input in input_files() {
        let decision = portcullis_eval(&policy, &input).expect("decision is defined");
        if decision["allowed"] == JsonValue::Bool(true) {
            allowed += 1;
        } else {
            statuses.insert(decision["http_status"].as_u64().expect("deny has a status"));
        }
    }

    assert!(allowed >= 5, "only {allowed} allowed inputs");
    assert_eq!(statuses, [400, 403].into_iter().collect());
}

#[test]
fn rego_tests_pass_in_opa() {
    let Some(opa) = find_opa("rego_tests_pass_in_opa") else {
        return;
    };

    // `-b` loads each folder as a bundle, as it is served: only `data.json`/`data.yaml`
    // files are data. Without it OPA would merge the input fixtures under testdata/ into
    // `data` and fail on their conflicting values.
    for name in ["example", "default"] {
        let output = Command::new(&opa)
            .args(["test", "-b"])
            .arg(repository_bundle(name))
            .output()
            .expect("opa test starts");

        assert!(
            output.status.success(),
            "opa test -b policies/{name} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn opa_built_archive_loads_like_the_folder() {
    let Some(opa) = find_opa("opa_built_archive_loads_like_the_folder") else {
        return;
    };
    let folder = tempfile::tempdir().unwrap();
    let archive = folder.path().join("example.tar.gz");
    let bundle_path = repository_bundle("example");

    let output = Command::new(&opa)
        .args(["build", "--bundle"])
        .arg(&bundle_path)
        .arg("--output")
        .arg(&archive)
        .output()
        .expect("opa build starts");
    assert!(
        output.status.success(),
        "opa build failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let from_archive = load_bundle(&archive).expect("opa-built archive loads");
    let from_folder = load_bundle(&bundle_path).unwrap();

    assert_eq!(from_archive.revision(), "example-1");
    assert_eq!(from_archive.roots(), from_folder.roots());
    assert_eq!(from_archive.data(), from_folder.data());
    let sources = |bundle: &portcullis_policy::Bundle| -> Vec<String> {
        let mut sources: Vec<String> = bundle
            .modules()
            .iter()
            .map(|module| module.source().to_string())
            .collect();
        sources.sort();
        sources
    };
    // `opa build` reformats modules, so the archive's sources need not match byte for
    // byte; the decisions must.
    assert_eq!(sources(&from_archive).len(), sources(&from_folder).len());
    let archive_policy = Policy::compile(&from_archive, "envoy/authz/allow").unwrap();
    let folder_policy = Policy::compile(&from_folder, "envoy/authz/allow").unwrap();
    for input in input_files() {
        assert_eq!(
            portcullis_eval(&archive_policy, &input),
            portcullis_eval(&folder_policy, &input),
            "decisions differ for {}",
            input.display()
        );
    }
}
