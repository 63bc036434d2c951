//! Starting the servers under test, waiting until they are ready, reading their memory
//! use, and stopping them.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// How long a server may take from start to ready before the run fails.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How often readiness is polled while waiting.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(2);

/// A server process that could not be started or did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot find a free port on 127.0.0.1: {0}")]
    Port(std::io::Error),

    #[error("cannot create log file {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },

    #[error("{name} exited with {status} before it was ready; its log {log} ends with:\n{tail}")]
    Exited {
        name: String,
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },

    #[error("{name} was not ready within {timeout:?}; last error: {last_error}; see its log {log}")]
    NotReady {
        name: String,
        timeout: Duration,
        last_error: String,
        log: PathBuf,
    },
}

/// Returns a port on 127.0.0.1 that was free a moment ago.
///
/// NOTE: another program may take the port before the server binds it. The server then
/// fails to start, and the run stops with its log.
pub fn free_address() -> Result<SocketAddr, ProcessError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(ProcessError::Port)?;
    listener.local_addr().map_err(ProcessError::Port)
}

/// A running server under test; it is killed when dropped.
pub struct Server {
    pub name: String,
    child: Child,
    log: PathBuf,
    started: Instant,
}

impl Server {
    /// Starts `program` with `args`, with both output streams going to `log`.
    pub fn start(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<Server, ProcessError> {
        let open_log = || {
            std::fs::File::create(log).map_err(|source| ProcessError::Log {
                path: log.to_path_buf(),
                source,
            })
        };
        let stdout = open_log()?;
        let stderr = stdout.try_clone().map_err(|source| ProcessError::Log {
            path: log.to_path_buf(),
            source,
        })?;

        let started = Instant::now();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                program: program.display().to_string(),
                source,
            })?;
        Ok(Server {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            started,
        })
    }

    /// Calls `probe` until it succeeds and returns the time from the start of the process.
    /// Fails when the process exits or `READY_TIMEOUT` passes first.
    pub async fn wait_ready<F, Fut, E>(&mut self, mut probe: F) -> Result<Duration, ProcessError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let mut last_error = String::from("none");
        while self.started.elapsed() < READY_TIMEOUT {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(ProcessError::Exited {
                    name: self.name.clone(),
                    status,
                    log: self.log.clone(),
                    tail: log_tail(&self.log),
                });
            }
            match probe().await {
                Ok(()) => return Ok(self.started.elapsed()),
                Err(error) => last_error = error.to_string(),
            }
            tokio::time::sleep(READY_POLL_INTERVAL).await;
        }
        Err(ProcessError::NotReady {
            name: self.name.clone(),
            timeout: READY_TIMEOUT,
            last_error,
            log: self.log.clone(),
        })
    }

    /// Returns the peak resident set size so far (`VmHWM` in /proc/PID/status), in bytes.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        parse_vm_hwm(&status)
    }

    /// Kills the process and waits for it to exit.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Reads the `VmHWM:` line of a /proc/PID/status text, given in kB, as bytes.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kilobytes: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kilobytes * 1024)
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_bytes() {
        let status =
            "Name:\tportcullis\nVmPeak:\t  200000 kB\nVmHWM:\t   12345 kB\nVmRSS:\t   12000 kB\n";

        assert_eq!(parse_vm_hwm(status), Some(12345 * 1024));
    }

    #[test]
    fn vm_hwm_missing_is_none() {
        assert_eq!(parse_vm_hwm("Name:\tkthreadd\n"), None);
    }
}
