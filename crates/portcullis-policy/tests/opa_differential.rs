//! Differential tests against the real OPA binary: the example bundle must decide every
//! input in `policies/example/testdata/inputs/` exactly as `opa eval` does, and bundles
//! with undefined function calls must fail to compile exactly where `opa check` rejects them.
//!
//! The binary is found through `PORTCULLIS_OPA`, then `opa` on `PATH`, then
//! `$HOME/.cache/portcullis/bin/opa`. Without it the tests print `SKIPPED` and pass, unless
//! `PORTCULLIS_REQUIRE_PEERS=1` is set, which makes a missing binary a failure.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{repository_bundle, write_files};
use portcullis_policy::{Policy, PolicyError, load_bundle};
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

/// How both engines should treat one function call case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallOutcome {
    Compiles,
    /// Rejected because `function` is undefined at `line` of the policy file.
    Undefined {
        line: u32,
        function: &'static str,
    },
    /// Accepted by OPA, rejected by portcullis because regorus lacks the builtin.
    UnsupportedBuiltin {
        line: u32,
        function: &'static str,
    },
}

struct CallCase {
    name: &'static str,
    /// Files besides `envoy/authz/policy.rego`.
    other_files: &'static [(&'static str, &'static str)],
    policy: &'static str,
    expected: CallOutcome,
}

const LIB_DOUBLE: (&str, &str) = ("lib/lib.rego", "package lib\n\ndouble(x) := x * 2\n");

const CALL_CASES: &[CallCase] = &[
    CallCase {
        name: "dotted and plain builtins",
        other_files: &[],
        policy: "package envoy.authz\n\nimport rego.v1\n\nallow if {\n\tjson.marshal({}) == \"{}\"\n\ttime.now_ns() > 0\n\turlquery.decode(\"a\") == \"a\"\n\tobject.get(input, \"a\", 1) == 1\n\tcount([]) == 0\n\tprint(\"x\")\n}\n",
        expected: CallOutcome::Compiles,
    },
    CallCase {
        name: "functions of the same package",
        other_files: &[(
            "envoy/authz/more.rego",
            "package envoy.authz\n\nthird(x) := x\n",
        )],
        policy: "package envoy.authz\n\nallow if {\n\tdouble(1) == 2\n\tlimits.top(1) == 1\n\tfallback(1) == 0\n\tthird(1) == 1\n}\n\ndouble(x) := x * 2\n\nlimits.top(x) := x\n\ndefault fallback(_) := 0\n",
        expected: CallOutcome::Compiles,
    },
    CallCase {
        name: "functions of another package",
        other_files: &[LIB_DOUBLE],
        policy: "package envoy.authz\n\nimport data.lib\nimport data.lib as helpers\n\nallow if {\n\tdata.lib.double(1) == 2\n\tlib.double(1) == 2\n\thelpers.double(1) == 2\n\tlib[\"double\"](1) == 2\n}\n",
        expected: CallOutcome::Compiles,
    },
    CallCase {
        name: "future keywords import",
        other_files: &[],
        policy: "package envoy.authz\n\nimport future.keywords.in\n\nallow if \"a\" in split(\"a,b\", \",\")\n",
        expected: CallOutcome::Compiles,
    },
    CallCase {
        name: "unknown function in an unreached rule",
        other_files: &[],
        policy: "package envoy.authz\n\nallow := true\n\ntag := t if {\n\tinput.never\n\tt := no_such_function(1)\n}\n",
        expected: CallOutcome::Undefined {
            line: 7,
            function: "no_such_function",
        },
    },
    CallCase {
        name: "misspelt dotted builtin",
        other_files: &[],
        policy: "package envoy.authz\n\nallow := json.marshall({}) == \"{}\"\n",
        expected: CallOutcome::Undefined {
            line: 3,
            function: "json.marshall",
        },
    },
    CallCase {
        name: "import alias without the function",
        other_files: &[LIB_DOUBLE],
        policy: "package envoy.authz\n\nimport data.lib\n\nallow := lib.triple(1) == 3\n",
        expected: CallOutcome::Undefined {
            line: 5,
            function: "data.lib.triple",
        },
    },
    CallCase {
        name: "package path without a function",
        other_files: &[LIB_DOUBLE],
        policy: "package envoy.authz\n\nallow := data.lib.triple(1) == 3\n",
        expected: CallOutcome::Undefined {
            line: 3,
            function: "data.lib.triple",
        },
    },
    CallCase {
        name: "value rule called as a function",
        other_files: &[],
        policy: "package envoy.authz\n\nlimit := 3\n\nallow := limit(1)\n",
        expected: CallOutcome::Undefined {
            line: 5,
            function: "data.envoy.authz.limit",
        },
    },
    CallCase {
        name: "rule shadowing a builtin namespace",
        other_files: &[],
        policy: "package envoy.authz\n\njson.indent := 2\n\nallow := json.marshal({}) == \"{}\"\n",
        expected: CallOutcome::Undefined {
            line: 5,
            function: "data.envoy.authz.json.marshal",
        },
    },
    CallCase {
        name: "import of input",
        other_files: &[],
        policy: "package envoy.authz\n\nimport input.attributes\n\nallow := attributes.check(1)\n",
        expected: CallOutcome::Undefined {
            line: 5,
            function: "input.attributes.check",
        },
    },
    CallCase {
        name: "call in a with modifier",
        other_files: &[],
        policy: "package envoy.authz\n\nallow if {\n\tinput.x == 1 with input as bad(1)\n}\n",
        expected: CallOutcome::Undefined {
            line: 4,
            function: "bad",
        },
    },
    CallCase {
        name: "call in an else value",
        other_files: &[],
        policy: "package envoy.authz\n\nallow := 1 if false else := bad(1)\n",
        expected: CallOutcome::Undefined {
            line: 3,
            function: "bad",
        },
    },
    CallCase {
        name: "OPA builtin missing from regorus",
        other_files: &[],
        policy: "package envoy.authz\n\nallow := io.jwt.decode(input.token)[1].admin\n",
        expected: CallOutcome::UnsupportedBuiltin {
            line: 3,
            function: "io.jwt.decode",
        },
    },
];

/// Runs `opa check --bundle` and returns the line and message of its first error, or
/// `None` when the bundle passes.
fn opa_check_outcome(opa: &Path, bundle: &Path) -> Result<Option<(u32, String)>, String> {
    let output = Command::new(opa)
        .args(["check", "--format", "json", "--bundle"])
        .arg(bundle)
        .output()
        .expect("opa check starts");
    if output.status.success() {
        return Ok(None);
    }

    let report: JsonValue = serde_json::from_slice(&output.stderr).map_err(|_| {
        format!(
            "opa check failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    let error = &report["errors"][0];
    let message = error["message"].as_str().unwrap_or_default().to_string();
    let line = error["location"]["row"].as_u64().unwrap_or_default() as u32;
    Ok(Some((line, message)))
}

/// Returns whether `opa check` rejected the bundle at the line in `expected`, naming the
/// same function. OPA words a call to a value rule as an arity error
/// (`function data.p.limit has arity 0, got 1 argument`), so only the name is compared.
fn opa_agrees(expected: CallOutcome, actual: &Option<(u32, String)>) -> bool {
    match (expected, actual) {
        (CallOutcome::Compiles | CallOutcome::UnsupportedBuiltin { .. }, None) => true,
        (CallOutcome::Undefined { line, function }, Some((actual_line, message))) => {
            *actual_line == line
                && (message == &format!("undefined function {function}")
                    || message.starts_with(&format!("function {function} has arity")))
        }
        _ => false,
    }
}

/// Returns whether portcullis compiled or rejected the bundle as `expected` requires.
fn portcullis_agrees(expected: CallOutcome, compiled: &Result<Policy, PolicyError>) -> bool {
    const POLICY_FILE: &str = "envoy/authz/policy.rego";
    match (expected, compiled) {
        (CallOutcome::Compiles, Ok(_)) => true,
        (
            CallOutcome::Undefined { line, function },
            Err(PolicyError::UndefinedFunction {
                file,
                line: actual_line,
                function: actual_function,
                ..
            }),
        )
        | (
            CallOutcome::UnsupportedBuiltin { line, function },
            Err(PolicyError::UnsupportedBuiltin {
                file,
                line: actual_line,
                function: actual_function,
                ..
            }),
        ) => file == POLICY_FILE && *actual_line == line && actual_function == function,
        _ => false,
    }
}

#[test]
fn undefined_function_checks_match_opa_check() {
    let Some(opa) = find_opa("undefined_function_checks_match_opa_check") else {
        return;
    };

    let mut mismatches = Vec::new();
    for case in CALL_CASES {
        let folder = tempfile::tempdir().unwrap();
        write_files(folder.path(), &[("envoy/authz/policy.rego", case.policy)]);
        write_files(folder.path(), case.other_files);

        let opa_actual = opa_check_outcome(&opa, folder.path());
        let bundle = load_bundle(folder.path()).expect("case bundle loads");
        let portcullis_actual = Policy::compile(&bundle, "envoy/authz/allow");

        if !opa_actual
            .as_ref()
            .is_ok_and(|actual| opa_agrees(case.expected, actual))
        {
            mismatches.push(format!(
                "{}: opa check expected {:?}, got {opa_actual:?}",
                case.name, case.expected
            ));
        }
        if !portcullis_agrees(case.expected, &portcullis_actual) {
            mismatches.push(format!(
                "{}: portcullis expected {:?}, got {portcullis_actual:?}",
                case.name, case.expected
            ));
        }
    }

    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn opa_builtins_missing_from_regorus_are_unsupported() {
    let Some(opa) = find_opa("opa_builtins_missing_from_regorus_are_unsupported") else {
        return;
    };
    let output = Command::new(&opa)
        .args(["capabilities", "--current"])
        .output()
        .expect("opa capabilities starts");
    assert!(output.status.success(), "opa capabilities failed");
    let capabilities: JsonValue =
        serde_json::from_slice(&output.stdout).expect("opa prints capabilities as JSON");
    let opa_builtins: Vec<&str> = capabilities["builtins"]
        .as_array()
        .expect("capabilities list builtins")
        .iter()
        .filter_map(|builtin| builtin["name"].as_str())
        .collect();
    assert!(
        opa_builtins.len() > 150,
        "only {} builtins",
        opa_builtins.len()
    );

    // Every OPA builtin compiles, either as a regorus builtin or rejected as unsupported,
    // never as undefined. Arguments are not checked, so one argument fits every name.
    let mut undefined = Vec::new();
    for name in opa_builtins {
        let folder = tempfile::tempdir().unwrap();
        let policy = format!("package envoy.authz\n\nallow := {name}(1)\n");
        write_files(folder.path(), &[("envoy/authz/policy.rego", &policy)]);
        let bundle = load_bundle(folder.path()).unwrap();

        match Policy::compile(&bundle, "envoy/authz/allow") {
            Ok(_) => {
                assert!(
                    name == "print" || regorus::unstable::BUILTINS.contains_key(name),
                    "{name} compiled but is no regorus builtin"
                );
            }
            Err(PolicyError::UnsupportedBuiltin { function, .. }) => {
                assert_eq!(function, name);
                assert!(!regorus::unstable::BUILTINS.contains_key(name));
            }
            Err(other) => undefined.push(format!("{name}: {other}")),
        }
    }

    assert!(
        undefined.is_empty(),
        "OPA builtins rejected as something other than unsupported \
         (add missing ones to OPA_BUILTINS_MISSING_FROM_REGORUS):\n{}",
        undefined.join("\n")
    );
}
