//! Compiling bundles and evaluating the decision rule.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{repository_bundle, write_files};
use portcullis_policy::{
    Bundle, CompileOptions, EvalError, Policy, PolicyError, PolicyStore, load_bundle,
};
use regorus::Value;

fn bundle_of(files: &[(&str, &str)]) -> Bundle {
    let folder = tempfile::tempdir().unwrap();
    write_files(folder.path(), files);
    load_bundle(folder.path()).expect("test bundle loads")
}

fn input(json: &str) -> Value {
    Value::from_json_str(json).expect("test input is JSON")
}

const DECISIONS: &str = r#"package envoy.authz

default allow := false

allow if input.user == "alice"

status := 200 if input.user == "alice"

decision := {"allowed": true, "headers": {"x-user": input.user}} if input.user
"#;

#[test]
fn evaluation_returns_true_false_undefined_and_objects() {
    let bundle = bundle_of(&[("envoy/authz/policy.rego", DECISIONS)]);
    let allow = Policy::compile(&bundle, "envoy/authz/allow").unwrap();
    let status = Policy::compile(&bundle, "envoy/authz/status").unwrap();
    let decision = Policy::compile(&bundle, "envoy/authz/decision").unwrap();

    assert_eq!(
        allow.evaluate(input(r#"{"user": "alice"}"#)).unwrap(),
        Value::from(true)
    );
    assert_eq!(
        allow.evaluate(input(r#"{"user": "bob"}"#)).unwrap(),
        Value::from(false)
    );
    assert_eq!(
        status.evaluate(input(r#"{"user": "bob"}"#)).unwrap(),
        Value::Undefined
    );
    assert_eq!(
        status.evaluate(input(r#"{"user": "alice"}"#)).unwrap(),
        Value::from(200u64)
    );
    assert_eq!(
        decision.evaluate(input(r#"{"user": "carol"}"#)).unwrap(),
        input(r#"{"allowed": true, "headers": {"x-user": "carol"}}"#)
    );
    assert_eq!(
        decision.evaluate(Value::Undefined).unwrap(),
        Value::Undefined
    );
}

#[test]
fn policy_reports_revision_digest_and_decision() {
    let bundle = bundle_of(&[
        (".manifest", r#"{"revision": "r42"}"#),
        ("envoy/authz/policy.rego", DECISIONS),
    ]);

    let policy = Policy::compile(&bundle, "/envoy/authz/allow").unwrap();

    assert_eq!(policy.revision(), "r42");
    assert_eq!(policy.digest(), bundle.digest());
    assert_eq!(policy.decision_path(), "envoy/authz/allow");
    assert_eq!(policy.rule(), "data.envoy.authz.allow");
}

#[test]
fn example_bundle_allows_public_read_with_headers() {
    let bundle = load_bundle(&repository_bundle("example")).unwrap();
    let policy = Policy::compile(&bundle, "envoy/authz/allow").unwrap();

    let decision = policy
        .evaluate(input(
            r#"{"attributes": {"request": {"http": {"method": "GET", "path": "/public/a", "headers": {}}}},
                "parsed_path": ["public", "a"], "parsed_query": {}}"#,
        ))
        .unwrap();

    assert_eq!(
        decision,
        input(
            r#"{"allowed": true,
                "headers": {"x-portcullis-policy": "example"},
                "request_headers_to_remove": ["x-internal-debug"],
                "response_headers_to_add": {"x-portcullis-decision": "allowed"},
                "dynamic_metadata": {"policy": "example", "reason": "public resource"}}"#
        )
    );
}

#[test]
fn decision_segment_with_hyphen_is_bracketed() {
    let bundle = bundle_of(&[(
        "envoy/policy.rego",
        "package envoy[\"ext-authz\"]\n\nallow := true\n",
    )]);

    let policy = Policy::compile(&bundle, "envoy/ext-authz/allow").unwrap();

    assert_eq!(policy.rule(), r#"data.envoy["ext-authz"].allow"#);
    assert_eq!(
        policy.evaluate(Value::Undefined).unwrap(),
        Value::from(true)
    );
}

#[test]
fn missing_decision_rule_names_path_and_packages() {
    let bundle = bundle_of(&[
        ("envoy/authz/policy.rego", DECISIONS),
        ("acme/lib.rego", "package acme.lib\n\nx := 1\n"),
    ]);

    let error = Policy::compile(&bundle, "envoy/authz/permit").unwrap_err();

    let PolicyError::DecisionNotFound {
        path,
        rule,
        packages,
    } = &error
    else {
        panic!("expected DecisionNotFound, got {error:?}");
    };
    assert_eq!(path, "envoy/authz/permit");
    assert_eq!(rule, "data.envoy.authz.permit");
    assert_eq!(
        packages,
        &["data.acme.lib".to_string(), "data.envoy.authz".to_string()]
    );
}

#[test]
fn test_file_rules_are_not_served() {
    let bundle = bundle_of(&[
        ("envoy/authz/policy.rego", DECISIONS),
        (
            "envoy/authz/policy_test.rego",
            "package envoy.authz\n\ntest_only := true\n",
        ),
    ]);

    let error = Policy::compile(&bundle, "envoy/authz/test_only").unwrap_err();

    assert!(
        matches!(error, PolicyError::DecisionNotFound { .. }),
        "unexpected error: {error:?}"
    );
}

#[test]
fn syntax_error_reports_file_line_and_message() {
    let bundle = bundle_of(&[(
        "envoy/authz/policy.rego",
        "package envoy.authz\n\nallow if {\n\tinput.user ==\n}\n",
    )]);

    let error = Policy::compile(&bundle, "envoy/authz/allow").unwrap_err();

    let PolicyError::Parse {
        file,
        line,
        column,
        message,
    } = &error
    else {
        panic!("expected Parse, got {error:?}");
    };
    assert_eq!(file, "envoy/authz/policy.rego");
    assert_eq!(*line, 5);
    assert_eq!(*column, 1);
    assert_eq!(message, "expecting expression");
}

#[test]
fn rego_v0_syntax_needs_the_option_or_manifest() {
    let v0_policy = "package envoy.authz\n\nallow { input.user == \"alice\" }\n";
    let bundle = bundle_of(&[("envoy/authz/policy.rego", v0_policy)]);
    let declared = bundle_of(&[
        (".manifest", r#"{"rego_version": 0}"#),
        ("envoy/authz/policy.rego", v0_policy),
    ]);
    let v0_options = CompileOptions {
        rego_v0: true,
        ..CompileOptions::default()
    };

    let default_error = Policy::compile(&bundle, "envoy/authz/allow").unwrap_err();
    let with_option = Policy::compile_with(&bundle, "envoy/authz/allow", &v0_options).unwrap();
    let with_manifest = Policy::compile(&declared, "envoy/authz/allow").unwrap();

    assert!(
        matches!(&default_error, PolicyError::Parse { line: 3, .. }),
        "unexpected error: {default_error:?}"
    );
    let alice = || input(r#"{"user": "alice"}"#);
    assert_eq!(with_option.evaluate(alice()).unwrap(), Value::from(true));
    assert_eq!(with_manifest.evaluate(alice()).unwrap(), Value::from(true));
}

#[test]
fn rule_and_data_at_same_path_conflict() {
    let bundle = bundle_of(&[
        ("envoy/authz/policy.rego", DECISIONS),
        ("envoy/authz/data.json", r#"{"allow": true}"#),
    ]);

    let error = Policy::compile(&bundle, "envoy/authz/allow").unwrap_err();

    assert_eq!(
        error.to_string(),
        "rule data.envoy.authz.allow conflicts with the data document at the same path"
    );
}

#[test]
fn deeply_nested_literal_is_rejected_before_parsing() {
    let literal = format!("{}1{}", "[".repeat(40), "]".repeat(40));
    let bundle = bundle_of(&[(
        "envoy/authz/policy.rego",
        &format!("package envoy.authz\n\nallow := {literal}\n"),
    )]);

    let error = Policy::compile(&bundle, "envoy/authz/allow").unwrap_err();

    assert_eq!(
        error.to_string(),
        "policy module envoy/authz/policy.rego nests expressions deeper than 16 levels at line 3"
    );
}

#[test]
fn long_evaluation_times_out() {
    let bundle = bundle_of(&[(
        "envoy/authz/policy.rego",
        "package envoy.authz\n\nallow := count([1 |\n\tsome i in numbers.range(1, 5000)\n\tsome j in numbers.range(1, 5000)\n])\n",
    )]);
    let options = CompileOptions {
        max_eval_time: Some(Duration::from_millis(50)),
        ..CompileOptions::default()
    };
    let policy = Policy::compile_with(&bundle, "envoy/authz/allow", &options).unwrap();

    let error = policy.evaluate(Value::new_object()).unwrap_err();

    let EvalError::TimedOut { rule, limit } = &error else {
        panic!("expected TimedOut, got {error:?}");
    };
    assert_eq!(rule, "data.envoy.authz.allow");
    assert_eq!(*limit, Duration::from_millis(50));
}

#[test]
fn runtime_error_is_an_evaluation_error_with_location() {
    // regorus reports the unsafe variable only when the rule is evaluated.
    let bundle = bundle_of(&[(
        "envoy/authz/policy.rego",
        "package envoy.authz\n\nallow if {\n\tinput.go\n\tx := y\n}\n",
    )]);
    let policy = Policy::compile(&bundle, "envoy/authz/allow").unwrap();

    let error = policy.evaluate(input(r#"{"go": true}"#)).unwrap_err();

    let EvalError::Failed { rule, message } = &error else {
        panic!("expected Failed, got {error:?}");
    };
    assert_eq!(rule, "data.envoy.authz.allow");
    assert!(
        message.starts_with("envoy/authz/policy.rego:5:"),
        "message lacks the location: {message}"
    );
}

#[test]
fn builtin_errors_are_undefined_as_in_opa() {
    let bundle = bundle_of(&[(
        "envoy/authz/policy.rego",
        "package envoy.authz\n\ndefault allow := \"fallback\"\n\nallow := [to_number(input.count), json.unmarshal(input.body)]\n",
    )]);
    let policy = Policy::compile(&bundle, "envoy/authz/allow").unwrap();

    assert_eq!(
        policy
            .evaluate(input(r#"{"count": "12", "body": "{}"}"#))
            .unwrap(),
        input(r#"[12, {}]"#)
    );
    assert_eq!(
        policy
            .evaluate(input(r#"{"count": "twelve", "body": "{}"}"#))
            .unwrap(),
        Value::from("fallback")
    );
    assert_eq!(
        policy
            .evaluate(input(r#"{"count": "12", "body": "{"}"#))
            .unwrap(),
        Value::from("fallback")
    );
}

#[test]
fn generations_increase_with_each_compilation() {
    let bundle = bundle_of(&[("envoy/authz/policy.rego", DECISIONS)]);

    let first = Policy::compile(&bundle, "envoy/authz/allow").unwrap();
    let second = Policy::compile(&bundle, "envoy/authz/allow").unwrap();

    assert!(second.generation() > first.generation());
    assert_ne!(first.generation(), 0);
}

#[test]
fn thread_local_engine_follows_the_policy_generation() {
    let version = |value: u64| {
        bundle_of(&[(
            "envoy/authz/policy.rego",
            &format!("package envoy.authz\n\nallow := {value}\n"),
        )])
    };
    let first = Policy::compile(&version(1), "envoy/authz/allow").unwrap();
    let second = Policy::compile(&version(2), "envoy/authz/allow").unwrap();

    // Alternating on one thread must never return a result from the other policy's engine.
    for _ in 0..3 {
        assert_eq!(first.evaluate(Value::Undefined).unwrap(), Value::from(1u64));
        assert_eq!(
            second.evaluate(Value::Undefined).unwrap(),
            Value::from(2u64)
        );
    }

    // Worker threads that evaluated through a store see the swapped policy on their next
    // request.
    let store = Arc::new(PolicyStore::new(first));
    let evaluate_on_workers = |store: &Arc<PolicyStore>| -> Vec<Value> {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| store.current().evaluate(Value::Undefined).unwrap()))
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap())
                .collect()
        })
    };
    assert_eq!(evaluate_on_workers(&store), vec![Value::from(1u64); 4]);

    let previous = store.swap(second);
    assert_eq!(
        previous.evaluate(Value::Undefined).unwrap(),
        Value::from(1u64)
    );
    assert_eq!(evaluate_on_workers(&store), vec![Value::from(2u64); 4]);
    assert_eq!(
        store.current().evaluate(Value::Undefined).unwrap(),
        Value::from(2u64)
    );
}

#[test]
fn input_does_not_leak_between_requests() {
    // Each thread reuses one engine, so the previous request's input must not survive
    // into the next evaluation.
    let bundle = bundle_of(&[(
        "envoy/authz/policy.rego",
        "package envoy.authz\n\ndefault allow := \"no user\"\n\nallow := input.user\n",
    )]);
    let policy = Policy::compile(&bundle, "envoy/authz/allow").unwrap();

    assert_eq!(
        policy.evaluate(input(r#"{"user": "alice"}"#)).unwrap(),
        Value::from("alice")
    );
    assert_eq!(
        policy.evaluate(Value::new_object()).unwrap(),
        Value::from("no user")
    );
    assert_eq!(
        policy.evaluate(Value::Undefined).unwrap(),
        Value::from("no user")
    );
}
