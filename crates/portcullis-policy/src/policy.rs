//! Compiling a bundle into a [`Policy`] and evaluating its decision rule per request.

use std::cell::RefCell;
use std::fmt;
use std::num::NonZeroU32;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::Program;
use regorus::rvm::vm::{RegoVM, VmError};
use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{CompiledPolicy, Engine, LimitError, Value};
use serde_json::Value as JsonValue;

use crate::bundle::Bundle;
use crate::diagnostic::one_line;
use crate::engine::{build_engine, package_names};
use crate::error::{EvalError, PolicyError};
use crate::function_calls::check_function_calls;
use tracing::{debug, info, warn};

/// Default for [`CompileOptions::max_eval_time`]: one second.
///
/// This is a safety bound against runaway policies, not a latency target. A decision that
/// needs anywhere near this long has already missed Envoy's ext_authz gRPC timeout, which
/// Envoy's documentation gives as 200 ms by default.
pub const DEFAULT_MAX_EVAL_TIME: Duration = Duration::from_secs(1);

/// Evaluation steps between two clock reads of the regorus execution timer. Reading the
/// clock every step would cost more than most steps.
const TIMER_CHECK_INTERVAL: NonZeroU32 = NonZeroU32::new(64).unwrap();

/// Maximum number of virtual-machine instructions that one evaluation may run.
///
/// regorus's own default (25,000) stops ordinary policies that iterate over a few thousand
/// data entries, which the interpreter evaluates without complaint. The wall-clock bound of
/// [`CompileOptions::max_eval_time`] is what protects against runaway policies; this bound
/// only stops a loop that never reads the clock.
const MAX_VM_INSTRUCTIONS: usize = 1 << 32;

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
    /// The regorus evaluator that runs the decision rule.
    pub engine: EngineChoice,
}

/// The regorus evaluator a [`Policy`] uses.
///
/// regorus can run a policy in its tree-walking interpreter or compile it to instructions
/// for its register virtual machine, which evaluates the same rules several times faster.
/// The virtual machine does not cover all of Rego yet (for example the `with` keyword), so
/// the default uses it only for policies it compiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// The virtual machine when the policy compiles for it, else the interpreter. An
    /// evaluation that the virtual machine fails (other than by running out of time) is
    /// repeated in the interpreter, so a gap in the virtual machine never turns into a deny.
    #[default]
    Auto,
    /// Always the interpreter.
    Interpreter,
    /// Always the virtual machine; compiling a policy it cannot run is an error.
    VirtualMachine,
}

impl EngineChoice {
    /// Returns the configuration name: `auto`, `interpreter` or `vm`.
    pub fn name(self) -> &'static str {
        match self {
            EngineChoice::Auto => "auto",
            EngineChoice::Interpreter => "interpreter",
            EngineChoice::VirtualMachine => "vm",
        }
    }
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            rego_v0: false,
            max_eval_time: Some(DEFAULT_MAX_EVAL_TIME),
            engine: EngineChoice::Auto,
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
    machine: Option<MachineProgram>,
    fall_back_to_interpreter: bool,
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
    machine: Option<RegoVM>,
}

/// The compiled program, data and limits from which each thread builds its own virtual machine.
struct MachineProgram {
    compiled: CompiledPolicy,
    program: Arc<Program>,
    data: Value,
    timer: Option<ExecutionTimerConfig>,
}

impl MachineProgram {
    fn new_machine(&self) -> Result<RegoVM, VmError> {
        let mut machine = RegoVM::new_with_policy(self.compiled.clone());
        machine.load_program(self.program.clone());
        machine.set_data(self.data.clone())?;
        // Same reason as the interpreter's setting in build_engine: policies written for
        // OPA expect a failing builtin to make its expression undefined.
        machine.set_strict_builtin_errors(false);
        machine.set_execution_timer_config(self.timer);
        machine.set_max_instructions(MAX_VM_INSTRUCTIONS);
        Ok(machine)
    }
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
        let timer = options.max_eval_time.map(|limit| ExecutionTimerConfig {
            limit,
            check_interval: TIMER_CHECK_INTERVAL,
        });
        if let Some(timer) = timer {
            engine.set_execution_timer_config(timer);
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
        let machine = compile_for_machine(bundle, compiled, &rule, timer, options.engine)?;

        Ok(Policy {
            prototype: engine,
            machine,
            fall_back_to_interpreter: options.engine == EngineChoice::Auto,
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
                let mut machine = self.new_machine();
                catch_unwind(AssertUnwindSafe(|| {
                    self.evaluate_on(&mut engine, machine.as_mut(), input)
                }))
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

        let cached = match &mut *slot {
            Some(cached) if cached.generation == self.generation => cached,
            _ => slot.insert(CachedEngine {
                generation: self.generation,
                engine: self.prototype.clone(),
                machine: self.new_machine(),
            }),
        };

        let outcome = catch_unwind(AssertUnwindSafe(|| {
            self.evaluate_on(&mut cached.engine, cached.machine.as_mut(), input)
        }));
        if outcome.is_err() {
            // The engine may be half-updated after a panic, so it is never reused.
            *slot = None;
        }
        Some(outcome)
    }

    /// Evaluates on the virtual machine when there is one, else (or when it fails and the
    /// policy may fall back) on the interpreter.
    fn evaluate_on(
        &self,
        engine: &mut Engine,
        machine: Option<&mut RegoVM>,
        input: Value,
    ) -> Result<Value, EvalError> {
        let input = match machine {
            Some(machine) => {
                machine.set_input(input.clone());
                match machine.execute_entry_point_by_index(0) {
                    Ok(value) => return Ok(value),
                    Err(VmError::TimeLimitExceeded { limit, .. }) => {
                        return Err(EvalError::TimedOut {
                            rule: self.rule.clone(),
                            limit,
                        });
                    }
                    Err(error) if !self.fall_back_to_interpreter => {
                        return Err(EvalError::Failed {
                            rule: self.rule.clone(),
                            message: one_line(&error.to_string()),
                        });
                    }
                    Err(error) => {
                        debug!(rule = %self.rule, %error, "virtual machine failed; evaluating in the interpreter");
                        input
                    }
                }
            }
            None => input,
        };

        engine.set_input(input);
        engine
            .eval_rule(self.rule.clone())
            .map_err(|error| self.eval_error(&error))
    }

    /// Builds this thread's virtual machine, or `None` when the policy runs in the
    /// interpreter. A machine that cannot load the bundle's data is logged and left out, so
    /// the interpreter evaluates instead.
    fn new_machine(&self) -> Option<RegoVM> {
        let program = self.machine.as_ref()?;
        match program.new_machine() {
            Ok(machine) => Some(machine),
            Err(error) => {
                warn!(rule = %self.rule, %error, "cannot prepare the virtual machine; evaluating in the interpreter");
                None
            }
        }
    }

    /// Returns which evaluator runs the decision rule: `vm` or `interpreter`.
    pub fn engine_name(&self) -> &'static str {
        if self.machine.is_some() { "vm" } else { "interpreter" }
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

/// Compiles the decision rule for regorus's virtual machine as `choice` requests.
///
/// Returns `None` when the interpreter is to be used: asked for, or `Auto` and the policy
/// uses something the virtual machine does not support.
fn compile_for_machine(
    bundle: &Bundle,
    compiled: CompiledPolicy,
    rule: &str,
    timer: Option<ExecutionTimerConfig>,
    choice: EngineChoice,
) -> Result<Option<MachineProgram>, PolicyError> {
    if choice == EngineChoice::Interpreter {
        return Ok(None);
    }

    let attempt = Compiler::compile_from_policy(&compiled, &[rule])
        .map_err(|error| one_line(&error.to_string()))
        .and_then(|program| {
            let data: Value = serde_json::from_value(bundle.data().clone())
                .map_err(|error| error.to_string())?;
            let machine = MachineProgram { compiled, program, data, timer };
            // Building one machine here proves the data loads, so threads never find out.
            machine.new_machine().map_err(|error| one_line(&error.to_string()))?;
            Ok(machine)
        });

    match (attempt, choice) {
        (Ok(machine), _) => Ok(Some(machine)),
        (Err(reason), EngineChoice::VirtualMachine) => Err(PolicyError::Check {
            message: format!("the policy cannot run in the virtual machine: {reason}"),
        }),
        (Err(reason), _) => {
            info!(%rule, %reason, "policy uses what the virtual machine does not support; evaluating in the interpreter");
            Ok(None)
        }
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
