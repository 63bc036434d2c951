//! Rego policy bundles for portcullis: loading, compiling, evaluating and hot reload.
//!
//! A [`Bundle`] is read from a folder or an OPA `.tar.gz` bundle with [`load_bundle`].
//! [`Policy::compile`] turns it into an evaluable policy for one decision rule, such as the
//! OPA Envoy plugin's default `envoy/authz/allow`. [`PolicyStore`] stores the active policy
//! and [`BundleWatcher`] replaces it when the bundle on disk changes.
//!
//! Evaluation uses the `regorus` interpreter in process. Rego v1 syntax is the default, as
//! in OPA 1.x.

mod bundle;
mod diagnostic;
mod engine;
mod error;
mod function_calls;
mod policy;
mod rego_test;
mod reload;

pub use bundle::{
    Bundle, BundleLimits, BundleModule, DEFAULT_MAX_FILES, DEFAULT_MAX_TOTAL_BYTES, RegoVersion,
    load_bundle, load_bundle_with_limits,
};
pub use engine::MAX_BRACKET_NESTING;
pub use error::{BundleError, EvalError, PolicyError};
pub use policy::{CompileOptions, DEFAULT_MAX_EVAL_TIME, EngineChoice, Policy};
pub use rego_test::{RegoTestOutcome, run_rego_tests};
pub use reload::{BundleWatcher, PolicyStore, ReloadObserver, ReloadOptions};
