//! Compiling a bundle into a [`Policy`] and evaluating its decision rule per request.

use std::cell::RefCell;
use std::fmt;
use std::num::NonZeroU32;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{Engine, LimitError, Value};
use serde_json::Value as JsonValue;

use crate::bundle::Bundle;
use crate::diagnostic::one_line;
use crate::engine::{build_engine, package_names};
use crate::error::{EvalError, PolicyError};
use crate::function_calls::check_function_calls;

/// Default for [`CompileOptions::max_eval_time`]: one second.
///
/// This is a safety bound against runaway policies, not a latency target. A decision that
/// needs anywhere near this long has already missed Envoy's ext_authz gRPC timeout, which
/// Envoy's documentation gives as 200 ms by default.
pub const DEFAULT_MAX_EVAL_TIME: Duration = Duration::from_secs(1);

/// Evaluation steps between two clock reads of the regorus execution timer. Reading the
/// clock every step would cost more than most steps.
const TIMER_CHECK_INTERVAL: NonZeroU32 = NonZeroU32::new(64).unwrap();

/// Source of [`Policy::generation`]. Starts at 1 so that 0 never names a policy.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// Options for [`Policy::compile_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileOptions {
    /// Parse modules as Rego v0 (pre-OPA-1.0 syntax). A manifest `rego_version` overrides it.
    pub rego_v0: bool,
    /// Wall-clock bound for one evaluation, or `None` for no bound.
    ///
    /// regorus checks the timer between evaluation steps, so one expensive builtin call
    /// (a large regex, a huge `numbers.range`) can overrun it.
    pub max_eval_time: Option<Duration>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            rego_v0: false,
            max_eval_time: Some(DEFAULT_MAX_EVAL_TIME),
        }
    }
}

/// A compiled bundle, ready to evaluate one decision rule.
///
/// Modules are parsed and analysed once, into a prototype engine. Each thread that
/// evaluates the policy clones the prototype once and keeps the clone for later requests,
/// because cloning a compiled regorus engine costs more than a typical evaluation.
/// `regorus::Engine` is `Send + Sync` with the `arc` feature, so the prototype needs no
/// lock: cloning it takes `&self`.
pub struct Policy {
    prototype: Engine,
    rule: String,
    decision_path: String,
    revision: String,
    digest: String,
    generation: u64,
}

/// The engine clone of the policy generation this thread evaluated last.
///
/// One slot per thread: after a reload, each thread clones the new policy on its first
/// request and drops the old clone.
// NOTE: a thread that alternates between two live policies (two stores, or a request that
// straddles a reload) clones on every switch, and an idle thread keeps its last clone until
// it evaluates again.
struct CachedEngine {
    generation: u64,
    engine: Engine,
}

// Compile-time proof of the `Send + Sync` claim on [`Policy`].
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
};

/// An evaluation result, or the payload of a panic inside regorus.
type EvalOutcome = std::thread::Result<Result<Value, EvalError>>;

thread_local! {
    static CACHED_ENGINE: RefCell<Option<CachedEngine>> = const { RefCell::new(None) };
}

impl Policy {
    /// Compiles `bundle` with the default [`CompileOptions`].
    ///
    /// `decision` is the OPA Envoy plugin's `path` setting: `envoy/authz/allow` evaluates
    /// the rule `data.envoy.authz.allow`.
    pub fn compile(bundle: &Bundle, decision: &str) -> Result<Policy, PolicyError> {
        Policy::compile_with(bundle, decision, &CompileOptions::default())
    }

    /// Compiles `bundle` for the decision rule at `decision`.
    ///
    /// Test modules (`*_test.rego`) are left out. Compilation fails when a module does not
    /// parse or a package or data path lies outside the manifest roots. It also fails when a
    /// rule calls a function that is neither defined in the bundle nor a regorus builtin, when
    /// no rule exists at the decision path, or when a rule and a data value share a path.
    // NOTE: regorus 0.14.1 reports some errors that OPA reports at compile time, such as
    // unsafe variables and calls with the wrong number of arguments, only when the
    // affected rule is evaluated.
    pub fn compile_with(
        bundle: &Bundle,
        decision: &str,
        options: &CompileOptions,
    ) -> Result<Policy, PolicyError> {
        let rule = rule_for_decision_path(decision)?;

        let mut engine = build_engine(bundle, options.rego_v0, false)?;
        check_function_calls(engine.get_modules())?;
        if let Some(limit) = options.max_eval_time {
            engine.set_execution_timer_config(ExecutionTimerConfig {
                limit,
                check_interval: TIMER_CHECK_INTERVAL,
            });
        }

        // Analysing the modules here leaves the prototype prepared, so clones start
        // evaluating without repeating the analysis.
        let compiled = match engine.compile_with_entrypoint(&regorus::Rc::from(rule.as_str())) {
            Ok(compiled) => compiled,
            Err(error) if error.to_string() == "not a valid rule path" => {
                return Err(PolicyError::DecisionNotFound {
                    path: decision.to_string(),
                    rule,
                    packages: package_names(&engine),
                });
            }
            Err(error) => {
                return Err(PolicyError::Check {
                    message: one_line(&error.to_string()),
                });
            }
        };
        check_rules_against_data(compiled.get_rules().keys(), bundle.data())?;

        Ok(Policy {
            prototype: engine,
            rule,
            decision_path: decision.trim_matches('/').to_string(),
            revision: bundle.revision().to_string(),
            digest: bundle.digest().to_string(),
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Evaluates the decision rule for `input`.
    ///
    /// Returns `Value::Undefined` when the rule is undefined for this input. Every error is
    /// meant to be a deny.
    pub fn evaluate(&self, input: Value) -> Result<Value, EvalError> {
        let mut pending_input = Some(input);
        let cached = CACHED_ENGINE
            .try_with(|slot| self.evaluate_cached(slot, &mut pending_input))
            .ok()
            .flatten();

        let outcome = match (cached, pending_input) {
            (Some(outcome), _) => outcome,
            (None, Some(input)) => {
                // The thread-local is gone (thread teardown) or in use: use a private clone.
                let mut engine = self.prototype.clone();
                catch_unwind(AssertUnwindSafe(|| self.evaluate_on(&mut engine, input)))
            }
            // evaluate_cached returns an outcome exactly when it took the input.
            (None, None) => Ok(Err(EvalError::Failed {
                rule: self.rule.clone(),
                message: "internal error: the input was consumed without an evaluation".into(),
            })),
        };

        outcome.unwrap_or_else(|_| {
            Err(EvalError::Panicked {
                rule: self.rule.clone(),
            })
        })
    }

    /// Evaluates on this thread's cached engine, cloning the prototype first when the slot
    /// contains another generation.
    ///
    /// Returns `None` and leaves the input pending when the slot is already borrowed, which
    /// only a nested call on the same thread could cause.
    fn evaluate_cached(
        &self,
        slot: &RefCell<Option<CachedEngine>>,
        pending_input: &mut Option<Value>,
    ) -> Option<EvalOutcome> {
        let mut slot = slot.try_borrow_mut().ok()?;
        let input = pending_input.take()?;

        let engine = match &mut *slot {
            Some(cached) if cached.generation == self.generation => &mut cached.engine,
            _ => {
                let cached = slot.insert(CachedEngine {
                    generation: self.generation,
                    engine: self.prototype.clone(),
                });
                &mut cached.engine
            }
        };

        let outcome = catch_unwind(AssertUnwindSafe(|| self.evaluate_on(engine, input)));
        if outcome.is_err() {
            // The engine may be half-updated after a panic, so it is never reused.
            *slot = None;
        }
        Some(outcome)
    }

    fn evaluate_on(&self, engine: &mut Engine, input: Value) -> Result<Value, EvalError> {
        engine.set_input(input);
        engine
            .eval_rule(self.rule.clone())
            .map_err(|error| self.eval_error(&error))
    }

    fn eval_error(&self, error: &anyhow::Error) -> EvalError {
        if let Some(LimitError::TimeLimitExceeded { limit, .. }) =
            error.downcast_ref::<LimitError>()
        {
            return EvalError::TimedOut {
                rule: self.rule.clone(),
                limit: *limit,
            };
        }
        EvalError::Failed {
            rule: self.rule.clone(),
            message: one_line(&error.to_string()),
        }
    }

    /// Returns the revision of the compiled bundle (see [`Bundle::revision`]).
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// Returns the content digest of the compiled bundle (see [`Bundle::digest`]).
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Returns the process-wide unique number of this compilation. Later compilations get
    /// larger numbers, so it also orders reloads.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Returns the decision path as configured, without leading or trailing `/`.
    pub fn decision_path(&self) -> &str {
        &self.decision_path
    }

    /// Returns the Rego rule that is evaluated, such as `data.envoy.authz.allow`.
    pub fn rule(&self) -> &str {
        &self.rule
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Policy")
            .field("rule", &self.rule)
            .field("revision", &self.revision)
            .field("digest", &self.digest)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Turns `envoy/authz/allow` into `data.envoy.authz.allow`.
///
/// Segments that are not plain Rego identifiers, or are keywords, use bracket notation
/// (`data.envoy["ext-authz"].allow`).
fn rule_for_decision_path(path: &str) -> Result<String, PolicyError> {
    let invalid = |reason| PolicyError::InvalidDecisionPath {
        path: path.to_string(),
        reason,
    };

    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return Err(invalid("the path is empty"));
    }

    let mut rule = String::from("data");
    for segment in trimmed.split('/') {
        if segment.is_empty() {
            return Err(invalid("the path contains an empty segment"));
        }
        if is_plain_identifier(segment) {
            rule.push('.');
            rule.push_str(segment);
        } else {
            rule.push('[');
            rule.push_str(&JsonValue::from(segment).to_string());
            rule.push(']');
        }
    }
    Ok(rule)
}

fn is_plain_identifier(segment: &str) -> bool {
    const KEYWORDS: &[&str] = &[
        "as", "contains", "data", "default", "else", "every", "false", "if", "import", "in",
        "input", "not", "null", "package", "some", "true", "with",
    ];

    let mut chars = segment.chars();
    let starts_well = chars
        .next()
        .is_some_and(|first| first == '_' || first.is_ascii_alphabetic());
    starts_well
        && chars.all(|next| next == '_' || next.is_ascii_alphanumeric())
        && !KEYWORDS.contains(&segment)
}

/// Rejects a rule whose path also contains a data value, which OPA reports as a conflict and
/// regorus 0.14.1 resolves silently in favour of the data.
// NOTE: only rules with dotted paths are checked. Rules under a bracketed package
// component (`package a["b.c"]`) are skipped.
fn check_rules_against_data<'a>(
    rule_paths: impl Iterator<Item = &'a String>,
    data: &JsonValue,
) -> Result<(), PolicyError> {
    for rule_path in rule_paths {
        if rule_path.contains(['[', '"']) {
            continue;
        }
        let Some(relative) = rule_path.strip_prefix("data.") else {
            continue;
        };

        let mut node = data;
        let mut conflict = true;
        for segment in relative.split('.') {
            match node.get(segment) {
                Some(child) => node = child,
                None => {
                    // A package folder that is a data object has no value at the rule's
                    // own path, so there is no conflict.
                    conflict = !node.is_object();
                    break;
                }
            }
        }
        if conflict {
            return Err(PolicyError::RuleConflictsWithData {
                rule: rule_path.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decision_path_maps_to_dotted_rule() {
        assert_eq!(
            rule_for_decision_path("envoy/authz/allow").unwrap(),
            "data.envoy.authz.allow"
        );
        assert_eq!(
            rule_for_decision_path("/envoy/authz/allow/").unwrap(),
            "data.envoy.authz.allow"
        );
    }

    #[test]
    fn decision_path_brackets_non_identifiers() {
        assert_eq!(
            rule_for_decision_path("envoy/ext-authz/if").unwrap(),
            r#"data.envoy["ext-authz"]["if"]"#
        );
    }

    #[test]
    fn decision_path_with_empty_segment_is_rejected() {
        let error = rule_for_decision_path("envoy//allow").unwrap_err();

        assert_eq!(
            error.to_string(),
            r#"invalid decision path "envoy//allow": the path contains an empty segment"#
        );
    }

    #[test]
    fn rule_on_data_leaf_conflicts() {
        let data = json!({"envoy": {"authz": {"allow": true, "roles": ["admin"]}}});
        let rules = ["data.envoy.authz.allow".to_string()];

        let error = check_rules_against_data(rules.iter(), &data).unwrap_err();

        assert_eq!(
            error.to_string(),
            "rule data.envoy.authz.allow conflicts with the data document at the same path"
        );
    }

    #[test]
    fn rule_beside_data_does_not_conflict() {
        let data = json!({"envoy": {"authz": {"roles": ["admin"]}}});
        let rules = [
            "data.envoy.authz.allow".to_string(),
            "data.other.x".to_string(),
        ];

        assert!(check_rules_against_data(rules.iter(), &data).is_ok());
    }
}
