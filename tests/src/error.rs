use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Failure to start, query or stop a process or server under test.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The peer cannot be installed on this machine, so tests that need it may be skipped.
    #[error("{peer} is not available: {reason}")]
    Unavailable { peer: &'static str, reason: String },

    #[error("{name} binary not found at {path}; {hint}")]
    BinaryNotFound {
        name: &'static str,
        path: PathBuf,
        hint: String,
    },

    #[error("{action} failed: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },

    #[error("starting {program} failed: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{name} not ready after {waited:?} (last check: {last_check}), last log lines:\n{log_tail}"
    )]
    NotReady {
        name: &'static str,
        waited: Duration,
        last_check: String,
        log_tail: String,
    },

    #[error("{name} exited early with {status}, last log lines:\n{log_tail}")]
    ExitedEarly {
        name: &'static str,
        status: ExitStatus,
        log_tail: String,
    },

    #[error("{name} still running after {waited:?}, last log lines:\n{log_tail}")]
    StillRunning {
        name: &'static str,
        waited: Duration,
        log_tail: String,
    },

    #[error("sending {signal} to {name} (pid {pid}) failed: {source}")]
    Signal {
        name: &'static str,
        signal: &'static str,
        pid: u32,
        #[source]
        source: nix::Error,
    },

    #[error("invalid audit event at {path}:{line_number}: {source}; line: {line}")]
    InvalidAuditEvent {
        path: PathBuf,
        line_number: usize,
        line: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("expected {expected} audit events in {path} within {waited:?}, found {found}")]
    MissingAuditEvents {
        path: PathBuf,
        expected: usize,
        found: usize,
        waited: Duration,
    },
}

impl LaunchError {
    pub(crate) fn io(action: impl Into<String>, source: io::Error) -> Self {
        LaunchError::Io {
            action: action.into(),
            source,
        }
    }
}
