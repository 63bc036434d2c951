//! The two regorus evaluators: the virtual machine that runs policies by default and the
//! interpreter it falls back to.

mod common;

use std::time::Duration;

use common::{repository_bundle, write_files};
use portcullis_policy::{Bundle, CompileOptions, EngineChoice, EvalError, Policy, load_bundle};
use regorus::Value;

fn bundle_of(files: &[(&str, &str)]) -> Bundle {
    let folder = tempfile::tempdir().unwrap();
    write_files(folder.path(), files);
    load_bundle(folder.path()).expect("test bundle loads")
}

fn compile(bundle: &Bundle, decision: &str, engine: EngineChoice) -> Result<Policy, String> {
    let options = CompileOptions {
        engine,
        ..CompileOptions::default()
    };
    Policy::compile_with(bundle, decision, &options).map_err(|error| error.to_string())
}

/// Reads every input document of the example bundle's tests, with its file name.
fn example_inputs() -> Vec<(String, Value)> {
    let folder = repository_bundle("example").join("testdata/inputs");
    let mut inputs: Vec<(String, Value)> = std::fs::read_dir(&folder)
        .expect("example inputs exist")
        .map(|entry| {
            let path = entry.unwrap().path();
            let value = Value::from_json_file(&path).expect("input is JSON");
            (path.file_name().unwrap().to_string_lossy().into_owned(), value)
        })
        .collect();
    inputs.sort_by(|a, b| a.0.cmp(&b.0));
    inputs
}

#[test]
fn repository_bundles_run_in_the_virtual_machine() {
    for name in ["example", "default"] {
        let bundle = load_bundle(&repository_bundle(name)).unwrap();

        let policy = Policy::compile(&bundle, "envoy/authz/allow").unwrap();

        assert_eq!(policy.engine_name(), "vm", "bundle {name}");
    }
}

#[test]
fn engines_agree_on_example_inputs() {
    let inputs = example_inputs();
    assert!(inputs.len() >= 30, "only {} inputs", inputs.len());

    for name in ["example", "default"] {
        let bundle = load_bundle(&repository_bundle(name)).unwrap();
        let machine = compile(&bundle, "envoy/authz/allow", EngineChoice::VirtualMachine).unwrap();
        let interpreter = compile(&bundle, "envoy/authz/allow", EngineChoice::Interpreter).unwrap();
        assert_eq!((machine.engine_name(), interpreter.engine_name()), ("vm", "interpreter"));

        for (file, input) in &inputs {
            let from_machine = machine.evaluate(input.clone()).unwrap();
            let from_interpreter = interpreter.evaluate(input.clone()).unwrap();

            assert_eq!(from_machine, from_interpreter, "bundle {name}, input {file}");
        }
    }
}

#[test]
fn policy_using_with_falls_back_to_the_interpreter() {
    let bundle = bundle_of(&[(
        "envoy/authz/policy.rego",
        "package envoy.authz\n\nis_admin if input.role == \"admin\"\n\nallow if is_admin with input.role as \"admin\"\n",
    )]);

    let automatic = compile(&bundle, "envoy/authz/allow", EngineChoice::Auto).unwrap();
    let forced = compile(&bundle, "envoy/authz/allow", EngineChoice::VirtualMachine);

    assert_eq!(automatic.engine_name(), "interpreter");
    assert_eq!(automatic.evaluate(Value::new_object()).unwrap(), Value::from(true));
    let error = forced.err().expect("the virtual machine refuses `with`");
    assert!(
        error.contains("cannot run in the virtual machine"),
        "unexpected error: {error}"
    );
}

#[test]
fn machine_completes_long_data_loops() {
    // regorus's default instruction limit would stop this loop over 20,000 data entries.
    let entries: Vec<String> = (0..20_000).map(|index| format!("\"user{index}\"")).collect();
    let data = format!("{{\"users\": [{}]}}", entries.join(","));
    let bundle = bundle_of(&[
        (
            "envoy/authz/policy.rego",
            "package envoy.authz\n\nallow if count([u | some u in data.envoy.authz.users; startswith(u, \"user\")]) == 20000\n",
        ),
        ("envoy/authz/data.json", &data),
    ]);

    let policy = compile(&bundle, "envoy/authz/allow", EngineChoice::VirtualMachine).unwrap();

    assert_eq!(policy.evaluate(Value::new_object()).unwrap(), Value::from(true));
}

#[test]
fn virtual_machine_stops_at_the_time_limit() {
    let bundle = bundle_of(&[(
        "envoy/authz/policy.rego",
        "package envoy.authz\n\nallow := count([1 |\n\tsome i in numbers.range(1, 5000)\n\tsome j in numbers.range(1, 5000)\n])\n",
    )]);
    let options = CompileOptions {
        max_eval_time: Some(Duration::from_millis(50)),
        engine: EngineChoice::VirtualMachine,
        ..CompileOptions::default()
    };
    let policy = Policy::compile_with(&bundle, "envoy/authz/allow", &options).unwrap();

    let error = policy.evaluate(Value::new_object()).unwrap_err();

    assert!(
        matches!(&error, EvalError::TimedOut { limit, .. } if *limit == Duration::from_millis(50)),
        "expected a time-out, got {error:?}"
    );
}

#[test]
fn machine_builtin_errors_are_undefined() {
    let bundle = bundle_of(&[(
        "envoy/authz/policy.rego",
        "package envoy.authz\n\ndefault allow := \"no\"\n\nallow := \"yes\" if urlquery.decode(input.q) == \"x\"\n",
    )]);
    let machine = compile(&bundle, "envoy/authz/allow", EngineChoice::VirtualMachine).unwrap();

    let outcome = machine.evaluate(Value::from_json_str(r#"{"q": "%"}"#).unwrap()).unwrap();

    assert_eq!(outcome, Value::from("no"));
}
