//! Running a bundle's Rego unit tests (`test_` rules) with regorus, as `opa test` does.

use regorus::Value;

use crate::bundle::Bundle;
use crate::diagnostic::one_line;
use crate::engine::build_engine;
use crate::error::PolicyError;

/// Package and rule of a module added only to list the bundle's rules: regorus 0.14.1
/// lists rules after compiling for an entry point, which must exist.
const PROBE_FILE: &str = "<portcullis rule listing>";
const PROBE_SOURCE: &str = "package portcullis_rule_listing\n\nprobe := true\n";
const PROBE_RULE: &str = "data.portcullis_rule_listing.probe";

/// Result of one Rego test rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RegoTestOutcome {
    /// Full rule path, such as `data.envoy.authz_test.test_public_get_is_allowed`.
    pub rule: String,
    /// `Ok(())` when the rule evaluated to `true`; otherwise the value or error, as text.
    pub result: Result<(), String>,
}

impl RegoTestOutcome {
    /// Returns whether the test passed.
    pub fn passed(&self) -> bool {
        self.result.is_ok()
    }
}

/// Evaluates every rule whose name starts with `test_` in `bundle`, test files included,
/// with no input, the way `opa test` runs them. Outcomes are sorted by rule path.
///
/// A test passes when its rule is `true`; `false`, undefined or an error fails it.
pub fn run_rego_tests(bundle: &Bundle, rego_v0: bool) -> Result<Vec<RegoTestOutcome>, PolicyError> {
    let mut engine = build_engine(bundle, rego_v0, true)?;
    engine
        .add_policy(PROBE_FILE.to_string(), PROBE_SOURCE.to_string())
        .map_err(|error| PolicyError::Check {
            message: one_line(&error.to_string()),
        })?;

    let compiled = engine
        .compile_with_entrypoint(&regorus::Rc::from(PROBE_RULE))
        .map_err(|error| PolicyError::Check {
            message: one_line(&error.to_string()),
        })?;
    let mut test_rules: Vec<String> = compiled
        .get_rules()
        .keys()
        .filter(|rule| {
            rule.rsplit('.')
                .next()
                .is_some_and(|name| name.starts_with("test_"))
        })
        .cloned()
        .collect();
    test_rules.sort();

    let outcomes = test_rules
        .into_iter()
        .map(|rule| {
            // A fresh clone per test, so no test inherits state from another.
            let mut test_engine = engine.clone();
            let result = match test_engine.eval_rule(rule.clone()) {
                Ok(Value::Bool(true)) => Ok(()),
                Ok(Value::Undefined) => Err("undefined".to_string()),
                Ok(other) => Err(format!("evaluated to {other}")),
                Err(error) => Err(one_line(&error.to_string())),
            };
            RegoTestOutcome { rule, result }
        })
        .collect();
    Ok(outcomes)
}
