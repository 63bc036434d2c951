//! Error types, one per failure family: reading a bundle, compiling it, evaluating a request.

use std::path::PathBuf;
use std::time::Duration;

/// Failure to read a bundle from a folder or a `.tar.gz` archive.
///
/// Paths inside the bundle (`file`, `entry`) are bundle-relative with `/` separators, the
/// way OPA names them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("failed to read bundle {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "bundle {path} is neither a folder nor a gzip-compressed tar archive (first bytes {magic})"
    )]
    UnknownFormat { path: PathBuf, magic: String },

    #[error("invalid bundle archive: {message}")]
    InvalidArchive { message: String },

    #[error("bundle archive entry {entry:?} rejected: {reason}")]
    UnsafeEntry { entry: String, reason: &'static str },

    #[error("bundle archive contains {entry:?} more than once")]
    DuplicateEntry { entry: String },

    #[error(
        "bundle exceeds the limit of {limit} uncompressed bytes; raise max_total_bytes if it is expected"
    )]
    TooLarge { limit: u64 },

    #[error("bundle exceeds the limit of {limit} files; raise max_files if it is expected")]
    TooManyFiles { limit: usize },

    #[error("bundle folder nesting exceeds {limit} levels at {path} (symlink loop?)")]
    TooDeep { path: PathBuf, limit: usize },

    #[error("bundle file {file} is not valid UTF-8")]
    InvalidUtf8 { file: String },

    #[error("invalid bundle manifest .manifest: {message}")]
    InvalidManifest { message: String },

    #[error("invalid data file {file} at line {line}, column {column}: {message}")]
    InvalidData {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },

    #[error("invalid data file {file}: {message}")]
    InvalidDataValue { file: String, message: String },

    #[error("data file {file} at the bundle root must contain an object, found {found}")]
    RootDataNotObject { file: String, found: &'static str },

    #[error("data file {file} conflicts with other bundle data at path {path}")]
    DataConflict { file: String, path: String },

    #[error("manifest roots {roots:?} do not permit data at path {path}")]
    DataOutsideRoots { path: String, roots: Vec<String> },
}

/// Failure to turn a loaded bundle into an evaluable [`crate::Policy`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("invalid decision path {path:?}: {reason}")]
    InvalidDecisionPath { path: String, reason: &'static str },

    #[error("failed to parse {file} at line {line}, column {column}: {message}")]
    Parse {
        file: String,
        line: u32,
        column: u32,
        message: String,
    },

    #[error("failed to load {file}: {message}")]
    Load { file: String, message: String },

    #[error("policy module {file} nests expressions deeper than {limit} levels at line {line}")]
    TooDeep {
        file: String,
        line: u32,
        limit: usize,
    },

    #[error("manifest roots {roots:?} do not permit package {package} in {file}")]
    PackageOutsideRoots {
        file: String,
        package: String,
        roots: Vec<String>,
    },

    #[error(
        "no rule {rule} found for decision path {path:?}; packages in the bundle: {packages:?}"
    )]
    DecisionNotFound {
        path: String,
        rule: String,
        packages: Vec<String>,
    },

    #[error("rule {rule} conflicts with the data document at the same path")]
    RuleConflictsWithData { rule: String },

    #[error("invalid bundle data: {message}")]
    InvalidData { message: String },

    #[error("policy check failed: {message}")]
    Check { message: String },

    /// A call to a function that no module defines and that is not a regorus builtin.
    ///
    /// `function` is the name OPA reports: the full `data.` path when the call resolves
    /// into the data document (through its package, an import or a `data.` reference),
    /// otherwise the name as written. `line` and `column` locate the start of the name,
    /// counted as regorus counts them for parse errors: from 1, with a tab advancing the
    /// column by four.
    #[error("{file}:{line}:{column}: undefined function {function}")]
    UndefinedFunction {
        file: String,
        line: u32,
        column: u32,
        function: String,
    },

    /// A call to an OPA builtin that regorus does not implement, such as `io.jwt.decode`.
    /// The location is counted as for [`PolicyError::UndefinedFunction`].
    #[error(
        "{file}:{line}:{column}: unsupported builtin {function}: OPA defines it, but the regorus engine does not implement it"
    )]
    UnsupportedBuiltin {
        file: String,
        line: u32,
        column: u32,
        function: String,
    },
}

/// Failure to evaluate the decision rule for one input.
///
/// Callers on the request path treat every variant as a deny (fail closed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    #[error("evaluation of {rule} exceeded the time limit of {limit:?}")]
    TimedOut { rule: String, limit: Duration },

    #[error("evaluation of {rule} failed: {message}")]
    Failed { rule: String, message: String },

    #[error("evaluation of {rule} panicked inside the Rego engine")]
    Panicked { rule: String },
}
