//! A child process whose stdout and stderr go to files, killed when dropped.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::LaunchError;

/// Number of log lines that launch errors and diagnostics show from each output file.
pub(crate) const LOG_TAIL_LINES: usize = 40;

/// Interval between checks while waiting for a child process to exit.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(20);

pub(crate) struct ChildProcess {
    name: &'static str,
    child: Child,
    output_paths: Vec<PathBuf>,
}

impl ChildProcess {
    /// Starts `command` with stdin closed, stdout written to `stdout_path` and stderr to
    /// `stderr_path` (which may be the same file).
    pub(crate) fn spawn(
        name: &'static str,
        command: &mut Command,
        stdout_path: &Path,
        stderr_path: &Path,
    ) -> Result<Self, LaunchError> {
        let stdout = create_output_file(stdout_path)?;
        let stderr = if stderr_path == stdout_path {
            stdout.try_clone().map_err(|source| {
                LaunchError::io(
                    format!("duplicating the handle of {}", stdout_path.display()),
                    source,
                )
            })?
        } else {
            create_output_file(stderr_path)?
        };

        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                program: PathBuf::from(command.get_program()),
                source,
            })?;

        let mut output_paths = vec![stdout_path.to_path_buf()];
        if stderr_path != stdout_path {
            output_paths.push(stderr_path.to_path_buf());
        }
        Ok(ChildProcess {
            name,
            child,
            output_paths,
        })
    }

    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// Returns an error when the process has already exited.
    fn ensure_running(&mut self) -> Result<(), LaunchError> {
        match self.try_exit_status()? {
            None => Ok(()),
            Some(status) => Err(LaunchError::ExitedEarly {
                name: self.name,
                status,
                log_tail: self.log_tail(),
            }),
        }
    }

    fn try_exit_status(&mut self) -> Result<Option<ExitStatus>, LaunchError> {
        self.child.try_wait().map_err(|source| {
            LaunchError::io(format!("checking whether {} exited", self.name), source)
        })
    }

    /// Calls `check` every `poll_interval` until it returns `Ok`, and returns that value.
    ///
    /// Fails when the process exits, or when `timeout` passes; the error then carries the last
    /// error message of `check` and the log tail.
    pub(crate) async fn wait_until_ready<T, Check, CheckFuture>(
        &mut self,
        timeout: Duration,
        poll_interval: Duration,
        mut check: Check,
    ) -> Result<T, LaunchError>
    where
        Check: FnMut() -> CheckFuture,
        CheckFuture: Future<Output = Result<T, String>>,
    {
        let started = Instant::now();
        loop {
            self.ensure_running()?;
            let last_check = match check().await {
                Ok(value) => return Ok(value),
                Err(reason) => reason,
            };
            if started.elapsed() >= timeout {
                return Err(LaunchError::NotReady {
                    name: self.name,
                    waited: timeout,
                    last_check,
                    log_tail: self.log_tail(),
                });
            }
            tokio::time::sleep(poll_interval).await;
        }
    }

    /// Sends SIGTERM, failing when the process has already exited.
    pub(crate) fn send_sigterm(&mut self) -> Result<(), LaunchError> {
        if let Some(status) = self.try_exit_status()? {
            return Err(LaunchError::ExitedEarly {
                name: self.name,
                status,
                log_tail: self.log_tail(),
            });
        }
        let pid = self.id();
        let raw_pid = i32::try_from(pid).expect("Linux process ids fit in i32");
        kill(Pid::from_raw(raw_pid), Signal::SIGTERM).map_err(|source| LaunchError::Signal {
            name: self.name,
            signal: "SIGTERM",
            pid,
            source,
        })
    }

    /// Waits up to `timeout` for the process to exit and returns its exit status.
    pub(crate) async fn wait_for_exit(
        &mut self,
        timeout: Duration,
    ) -> Result<ExitStatus, LaunchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::StillRunning {
                    name: self.name,
                    waited: timeout,
                    log_tail: self.log_tail(),
                });
            }
            tokio::time::sleep(EXIT_POLL_INTERVAL).await;
        }
    }

    /// Returns the last lines of each output file, each block headed by the file's path.
    pub(crate) fn log_tail(&self) -> String {
        let mut tail = String::new();
        for path in &self.output_paths {
            tail.push_str(&format!("--- {} ({}) ---\n", self.name, path.display()));
            tail.push_str(&file_tail(path, LOG_TAIL_LINES));
        }
        tail
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Errors here mean the process already exited, which is what Drop wants.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn create_output_file(path: &Path) -> Result<File, LaunchError> {
    File::create(path)
        .map_err(|source| LaunchError::io(format!("creating {}", path.display()), source))
}

/// Returns the last `lines` lines of the file, or a note saying why it could not be read.
pub(crate) fn file_tail(path: &Path, lines: usize) -> String {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) => return format!("(cannot read {}: {error})\n", path.display()),
    };
    let text = String::from_utf8_lossy(&bytes);
    let all_lines: Vec<&str> = text.lines().collect();
    let first_shown = all_lines.len().saturating_sub(lines);

    let mut tail = String::new();
    for line in &all_lines[first_shown..] {
        tail.push_str(line);
        tail.push('\n');
    }
    if tail.is_empty() {
        tail.push_str("(empty)\n");
    }
    tail
}

/// Runs the install script `tests/peers/NAME` and returns the last line it printed (the path
/// of what it installed) with its trimmed standard error, or why it failed.
pub(crate) fn run_peer_script(name: &str) -> Result<(PathBuf, String), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers").join(name);
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|error| format!("running {} failed: {error}", script.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if !output.status.success() {
        return Err(format!("{} exited with {}: {stderr}", script.display(), output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last_line = stdout.lines().last().unwrap_or("").trim();
    Ok((PathBuf::from(last_line), stderr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_tail_keeps_only_the_last_lines() {
        let dir = tempfile::tempdir().expect("creating a temporary folder failed");
        let path = dir.path().join("log.txt");
        fs::write(&path, "one\ntwo\nthree\nfour\n").expect("writing the log failed");

        assert_eq!(file_tail(&path, 2), "three\nfour\n");
        assert_eq!(file_tail(&path, 10), "one\ntwo\nthree\nfour\n");
    }

    #[test]
    fn file_tail_of_missing_file_names_the_path() {
        let dir = tempfile::tempdir().expect("creating a temporary folder failed");
        let path = dir.path().join("missing.log");

        let tail = file_tail(&path, 5);

        assert!(
            tail.starts_with(&format!("(cannot read {}: ", path.display())),
            "{tail}"
        );
    }

    #[test]
    fn file_tail_of_empty_file_says_empty() {
        let dir = tempfile::tempdir().expect("creating a temporary folder failed");
        let path = dir.path().join("empty.log");
        fs::write(&path, "").expect("writing the log failed");

        assert_eq!(file_tail(&path, 5), "(empty)\n");
    }
}
