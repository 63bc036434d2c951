//! The compile-time check that every function call names a function the bundle defines or a
//! builtin that regorus implements.

mod common;

use common::{repository_bundle, write_files};
use portcullis_policy::{Bundle, CompileOptions, Policy, PolicyError, load_bundle};
use regorus::Value;

const DECISION: &str = "envoy/authz/allow";
const POLICY_FILE: &str = "envoy/authz/policy.rego";

fn bundle_of(files: &[(&str, &str)]) -> Bundle {
    let folder = tempfile::tempdir().unwrap();
    write_files(folder.path(), files);
    load_bundle(folder.path()).expect("test bundle loads")
}

fn compile_policy(source: &str) -> Result<Policy, PolicyError> {
    Policy::compile(&bundle_of(&[(POLICY_FILE, source)]), DECISION)
}

/// Returns file, line, column and function of an `UndefinedFunction` error.
fn undefined_function(error: PolicyError) -> (String, u32, u32, String) {
    match error {
        PolicyError::UndefinedFunction {
            file,
            line,
            column,
            function,
        } => (file, line, column, function),
        other => panic!("expected an undefined function error, got {other:?}"),
    }
}

fn undefined_at(line: u32, column: u32, function: &str) -> (String, u32, u32, String) {
    (POLICY_FILE.to_string(), line, column, function.to_string())
}

/// Returns the column regorus reports for byte `index` of the ASCII `line`: counted from 1,
/// with a tab advancing four columns.
fn regorus_column(line: &str, index: usize) -> u32 {
    let width = |character| if character == '\t' { 4 } else { 1 };
    1 + line[..index].chars().map(width).sum::<u32>()
}

#[test]
fn unreached_undefined_function_is_rejected() {
    let source = "package envoy.authz

default allow := false

allow if input.user == \"alice\"

# No input sets `never`, so evaluation never reaches the call.
audit_tag := tag if {
\tinput.never
\ttag := no_such_function(1)
}
";

    let error = compile_policy(source).unwrap_err();

    // The line starts with a tab, which regorus counts as four columns.
    assert_eq!(
        error.to_string(),
        "envoy/authz/policy.rego:10:12: undefined function no_such_function"
    );
    assert_eq!(
        undefined_function(error),
        undefined_at(10, 12, "no_such_function")
    );
}

#[test]
fn misspelt_dotted_builtin_is_rejected() {
    let source = "package envoy.authz

allow := json.marshall({\"a\": 1}) == \"{}\"
";

    let error = compile_policy(source).unwrap_err();

    assert_eq!(
        undefined_function(error),
        undefined_at(3, 10, "json.marshall")
    );
}

#[test]
fn builtin_calls_compile() {
    let source = "package envoy.authz

import rego.v1

allow if {
\tjson.marshal({\"a\": 1}) == `{\"a\":1}`
\ttime.now_ns() > 0
\turlquery.decode(\"a%20b\") == \"a b\"
\tobject.get(input, \"user\", \"anonymous\") == \"anonymous\"
\tcount([1, 2]) == 2
\tsprintf(\"%d\", [1]) == \"1\"
\tbase64url.encode(\"x\") == \"eA==\"
\tnet.cidr_contains(\"10.0.0.0/8\", \"10.1.2.3\")
\tregex.match(\"^a\", \"abc\")
\tprint(\"checked\")
}
";

    let policy = compile_policy(source).unwrap();

    assert_eq!(
        policy.evaluate(Value::new_object()).unwrap(),
        Value::from(true)
    );
}

#[test]
fn opa_builtin_missing_from_regorus_is_unsupported() {
    let source = "package envoy.authz

claims := io.jwt.decode(input.token)[1]

allow := claims.admin
";

    let error = compile_policy(source).unwrap_err();

    assert_eq!(
        error.to_string(),
        "envoy/authz/policy.rego:3:11: unsupported builtin io.jwt.decode: OPA defines it, \
         but the regorus engine does not implement it"
    );
    let PolicyError::UnsupportedBuiltin {
        file,
        line,
        column,
        function,
    } = error
    else {
        panic!("expected an unsupported builtin error, got {error:?}");
    };
    assert_eq!(file, POLICY_FILE);
    assert_eq!(line, 3);
    assert_eq!(column, 11);
    assert_eq!(function, "io.jwt.decode");
}

#[test]
fn functions_of_the_same_package_compile() {
    let bundle = bundle_of(&[
        (
            POLICY_FILE,
            "package envoy.authz

allow if {
\tdouble(2) == 4
\tlimits.max_of(1, 3) == 3
\tfallback(1) == 0
\tfrom_other_file(5) == 5
}

double(x) := x * 2

limits.max_of(a, b) := max([a, b])

default fallback(_) := 0
",
        ),
        (
            "envoy/authz/helpers.rego",
            "package envoy.authz\n\nfrom_other_file(x) := x\n",
        ),
    ]);

    let policy = Policy::compile(&bundle, DECISION).unwrap();

    assert_eq!(
        policy.evaluate(Value::new_object()).unwrap(),
        Value::from(true)
    );
}

#[test]
fn functions_of_other_packages_compile() {
    let bundle = bundle_of(&[
        (
            POLICY_FILE,
            "package envoy.authz

import data.lib
import data.lib.strings as text

allow if {
\tdata.lib.double(2) == 4
\tlib.double(3) == 6
\ttext.shout(\"a\") == \"A!\"
}
",
        ),
        ("lib/lib.rego", "package lib\n\ndouble(x) := x * 2\n"),
        (
            "lib/strings/strings.rego",
            "package lib.strings\n\nshout(s) := concat(\"\", [upper(s), \"!\"])\n",
        ),
    ]);

    let policy = Policy::compile(&bundle, DECISION).unwrap();

    assert_eq!(
        policy.evaluate(Value::new_object()).unwrap(),
        Value::from(true)
    );
}

#[test]
fn import_alias_without_the_function_is_rejected() {
    let bundle = bundle_of(&[
        (
            POLICY_FILE,
            "package envoy.authz

import data.lib

allow := lib.triple(1) == 3
",
        ),
        ("lib/lib.rego", "package lib\n\ndouble(x) := x * 2\n"),
    ]);

    let error = Policy::compile(&bundle, DECISION).unwrap_err();

    assert_eq!(
        undefined_function(error),
        undefined_at(5, 10, "data.lib.triple")
    );
}

#[test]
fn package_qualified_call_to_data_value_is_rejected() {
    let bundle = bundle_of(&[
        (
            POLICY_FILE,
            "package envoy.authz\n\nallow := data.lib.f(1)\n",
        ),
        ("lib/data.json", r#"{"f": 1}"#),
    ]);

    let error = Policy::compile(&bundle, DECISION).unwrap_err();

    assert_eq!(undefined_function(error), undefined_at(3, 10, "data.lib.f"));
}

#[test]
fn call_to_value_rule_is_rejected() {
    let source = "package envoy.authz

limit := 3

allow := limit(1)
";

    let error = compile_policy(source).unwrap_err();

    assert_eq!(
        undefined_function(error),
        undefined_at(5, 10, "data.envoy.authz.limit")
    );
}

#[test]
fn rule_named_like_builtin_namespace_shadows_it() {
    // OPA resolves `json.marshal` to the package's `json` rule, not to the builtin.
    let source = "package envoy.authz

json.indent := 2

allow := json.marshal({}) == \"{}\"
";

    let error = compile_policy(source).unwrap_err();

    assert_eq!(
        undefined_function(error),
        undefined_at(5, 10, "data.envoy.authz.json.marshal")
    );
}

#[test]
fn call_through_input_import_is_rejected() {
    let source = "package envoy.authz

import input.attributes

allow := attributes.check(1)
";

    let error = compile_policy(source).unwrap_err();

    assert_eq!(
        undefined_function(error),
        undefined_at(5, 10, "input.attributes.check")
    );
}

#[test]
fn bracketed_function_names_resolve() {
    let bundle = bundle_of(&[
        (
            POLICY_FILE,
            "package envoy.authz

import data.lib

allow if {
    data.lib[\"double\"](1) == 2
    lib[\"double\"](2) == 4
}
",
        ),
        ("lib/lib.rego", "package lib\n\ndouble(x) := x * 2\n"),
    ]);
    let misspelt = bundle_of(&[
        (
            POLICY_FILE,
            "package envoy.authz\n\nallow := data.lib[\"dubble\"](1) == 2\n",
        ),
        ("lib/lib.rego", "package lib\n\ndouble(x) := x * 2\n"),
    ]);

    let policy = Policy::compile(&bundle, DECISION).unwrap();
    let error = Policy::compile(&misspelt, DECISION).unwrap_err();

    assert_eq!(
        policy.evaluate(Value::new_object()).unwrap(),
        Value::from(true)
    );
    assert_eq!(
        undefined_function(error),
        undefined_at(3, 10, "data.lib.dubble")
    );
}

#[test]
fn calls_anywhere_in_a_rule_are_checked() {
    let cases = [
        "allow := bad(1)\n",
        "allow contains bad(1)\n",
        "allow[bad(1)] := 1\n",
        "allow if {\n\tinput.x == 1 with input as bad(1)\n}\n",
        "allow if {\n\tevery v in [1] { v == bad(v) }\n}\n",
        "allow if {\n\t[x | x := bad(1)] == []\n}\n",
        "allow if {\n\tsome x in bad(1)\n\tx\n}\n",
        "allow if {\n\tnot bad(1)\n}\n",
        "allow := 1 if false else := bad(1)\n",
        "allow := f(1)\n\nf(x) := bad(x)\n",
        "default allow := bad(1)\n",
    ];

    for rules in cases {
        let source = format!("package envoy.authz\n\n{rules}");
        let (line_index, line_text) = source
            .lines()
            .enumerate()
            .find(|(_, text)| text.contains("bad("))
            .expect("case calls bad");
        let line = line_index as u32 + 1;
        let column = regorus_column(line_text, line_text.find("bad(").expect("line calls bad"));

        let error = compile_policy(&source).unwrap_err();

        assert_eq!(
            undefined_function(error),
            undefined_at(line, column, "bad"),
            "rules:\n{rules}"
        );
    }
}

#[test]
fn earliest_undefined_call_is_reported() {
    let source = "package envoy.authz

allow if {
\tfirst_typo(1)
\tsecond_typo(2)
}

allow := outer_typo(inner_typo(3)) if false
";
    let later_rule_only = source
        .replace("first_typo", "count")
        .replace("second_typo", "count");

    let first = compile_policy(source).unwrap_err();
    let nested = compile_policy(&later_rule_only).unwrap_err();

    assert_eq!(undefined_function(first), undefined_at(4, 5, "first_typo"));
    assert_eq!(
        undefined_function(nested),
        undefined_at(8, 10, "outer_typo")
    );
}

#[test]
fn keyword_imports_bind_no_alias() {
    let rego_v1_import = "package envoy.authz

import rego.v1

allow if \"a\" in split(\"a,b\", \",\")
";
    let future_import = "package envoy.authz

import future.keywords.in

allow if \"a\" in split(\"a,b\", \",\")
";
    let v0_future_imports = "package envoy.authz

import future.keywords.if
import future.keywords.in

allow if { \"a\" in split(\"a,b\", \",\") }
";
    let v0_options = CompileOptions {
        rego_v0: true,
        ..CompileOptions::default()
    };

    let rego_v1_policy = compile_policy(rego_v1_import).unwrap();
    let future_policy = compile_policy(future_import).unwrap();
    let v0_policy = Policy::compile_with(
        &bundle_of(&[(POLICY_FILE, v0_future_imports)]),
        DECISION,
        &v0_options,
    )
    .unwrap();

    for policy in [rego_v1_policy, future_policy, v0_policy] {
        assert_eq!(
            policy.evaluate(Value::new_object()).unwrap(),
            Value::from(true)
        );
    }
}

#[test]
fn undefined_function_in_test_module_is_ignored() {
    let bundle = bundle_of(&[
        (POLICY_FILE, "package envoy.authz\n\nallow := true\n"),
        (
            "envoy/authz/policy_test.rego",
            "package envoy.authz_test\n\ntest_allow if helper_not_written_yet(1)\n",
        ),
    ]);

    assert!(Policy::compile(&bundle, DECISION).is_ok());
}

#[test]
fn repository_bundles_compile() {
    for name in ["example", "default"] {
        let bundle = load_bundle(&repository_bundle(name)).expect("repository bundle loads");

        let compiled = Policy::compile(&bundle, DECISION);

        assert!(compiled.is_ok(), "policies/{name}: {:?}", compiled.err());
    }
}
