//! The portcullis binary, started with a generated config in a temporary folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::ChildProcess;
use crate::{ClientError, HttpRequest, LaunchError, free_loopback_address, send};

/// Environment variable naming the portcullis binary to test.
pub const PORTCULLIS_BINARY_VARIABLE: &str = "PORTCULLIS_BIN";

/// Maximum wait for `/readyz` to return 200. A debug build compiles the bundle in well under
/// a second when idle; the margin covers parallel tests and builds on a 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

const READY_POLL_INTERVAL: Duration = Duration::from_millis(50);

const AUDIT_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Settings written into the portcullis config file.
#[derive(Debug, Clone)]
pub struct PortcullisOptions {
    /// Bundle folder or `.tar.gz` file.
    pub bundle: PathBuf,
    /// Path of the decision rule inside the bundle, such as `envoy/authz/allow`.
    pub decision: String,
    /// How often portcullis checks the bundle for changes.
    pub reload_interval: Duration,
    /// How long portcullis lets in-flight checks finish after SIGTERM.
    pub drain: Duration,
    pub log_level: String,
    /// YAML appended to the generated config as is, for sections the launcher does not
    /// write itself (such as `tls` and `vault`).
    pub extra_config: String,
}

impl PortcullisOptions {
    /// Returns options for the decision `envoy/authz/allow`, a 1 s reload interval, a 5 s
    /// drain, and debug logs from the portcullis crates only.
    pub fn new(bundle: impl Into<PathBuf>) -> Self {
        PortcullisOptions {
            bundle: bundle.into(),
            decision: "envoy/authz/allow".to_string(),
            reload_interval: Duration::from_secs(1),
            drain: Duration::from_secs(5),
            // Debug level for everything would fill the log tail with HTTP/2 frame traces.
            log_level: "info,portcullis=debug,portcullis_authz=debug,portcullis_policy=debug,portcullis_audit=debug".to_string(),
            extra_config: String::new(),
        }
    }
}

/// Returns the YAML config for `options`, with the gRPC and admin listeners on the given
/// addresses and the audit events written to `audit_path`.
pub fn config_yaml(
    options: &PortcullisOptions,
    grpc_address: SocketAddr,
    admin_address: SocketAddr,
    audit_path: &Path,
) -> String {
    format!(
        "listen:
  address: {grpc}
admin:
  address: {admin}
policy:
  bundle: {bundle}
  decision: {decision}
  reload_interval: {reload}
audit:
  sink: file
  path: {audit}
log:
  level: {level}
  format: text
shutdown:
  drain: {drain}
{extra}",
        grpc = yaml_string(&grpc_address.to_string()),
        admin = yaml_string(&admin_address.to_string()),
        bundle = yaml_string(&options.bundle.to_string_lossy()),
        decision = yaml_string(&options.decision),
        reload = yaml_string(&format!("{}ms", options.reload_interval.as_millis())),
        audit = yaml_string(&audit_path.to_string_lossy()),
        level = yaml_string(&options.log_level),
        drain = yaml_string(&format!("{}ms", options.drain.as_millis())),
        extra = options.extra_config,
    )
}

/// Quotes `value` as a YAML double-quoted scalar. JSON string escapes are a subset of YAML's.
fn yaml_string(value: &str) -> String {
    serde_json::Value::from(value).to_string()
}

/// A running portcullis, killed when dropped.
pub struct Portcullis {
    process: ChildProcess,
    grpc_address: SocketAddr,
    admin_address: SocketAddr,
    audit_path: PathBuf,
    config_path: PathBuf,
    // Holds the config, the audit file and the output until the test ends.
    _work_dir: TempDir,
}

impl Portcullis {
    /// Returns the portcullis binary: `PORTCULLIS_BIN` when set, else `portcullis` in the
    /// Cargo target profile folder that contains this test executable.
    pub fn binary() -> Result<PathBuf, LaunchError> {
        let (path, hint) = match std::env::var_os(PORTCULLIS_BINARY_VARIABLE) {
            Some(path) => (
                PathBuf::from(path),
                format!("fix or unset {PORTCULLIS_BINARY_VARIABLE}"),
            ),
            None => (
                binary_beside_test_executable()?,
                "build it first: cargo build -p portcullis".to_string(),
            ),
        };
        if !path.is_file() {
            return Err(LaunchError::BinaryNotFound {
                name: "portcullis",
                path,
                hint,
            });
        }
        Ok(path)
    }

    /// Writes a config for `options` with free loopback ports, starts `binary serve --config`
    /// and waits until `/readyz` returns 200.
    pub async fn start(binary: &Path, options: &PortcullisOptions) -> Result<Self, LaunchError> {
        let work_dir = tempfile::Builder::new()
            .prefix("portcullis-")
            .tempdir()
            .map_err(|source| LaunchError::io("creating portcullis's work folder", source))?;
        let grpc_address = free_loopback_address()
            .map_err(|source| LaunchError::io("finding a free port for gRPC", source))?;
        let admin_address = free_loopback_address()
            .map_err(|source| LaunchError::io("finding a free port for admin", source))?;
        let audit_path = work_dir.path().join("audit").join("decisions.jsonl");
        let config_path = work_dir.path().join("portcullis.yaml");
        std::fs::write(
            &config_path,
            config_yaml(options, grpc_address, admin_address, &audit_path),
        )
        .map_err(|source| LaunchError::io(format!("writing {}", config_path.display()), source))?;

        let mut command = Command::new(binary);
        command.arg("serve").arg("--config").arg(&config_path);
        // The output goes to files, where ANSI color codes would only obscure the log tail.
        command.env("NO_COLOR", "1");
        let mut process = ChildProcess::spawn(
            "portcullis",
            &mut command,
            &work_dir.path().join("stdout.log"),
            &work_dir.path().join("stderr.log"),
        )?;

        process
            .wait_until_ready(READY_TIMEOUT, READY_POLL_INTERVAL, || {
                check_ready(admin_address)
            })
            .await?;
        Ok(Portcullis {
            process,
            grpc_address,
            admin_address,
            audit_path,
            config_path,
            _work_dir: work_dir,
        })
    }

    /// Address of the ext_authz gRPC listener.
    pub fn grpc_address(&self) -> SocketAddr {
        self.grpc_address
    }

    pub fn admin_address(&self) -> SocketAddr {
        self.admin_address
    }

    pub fn audit_path(&self) -> &Path {
        &self.audit_path
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Returns the last lines of portcullis's stdout and stderr.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Sends SIGTERM without waiting, failing when portcullis has already exited.
    pub fn send_sigterm(&mut self) -> Result<(), LaunchError> {
        self.process.send_sigterm()
    }

    /// Waits up to `timeout` for portcullis to exit and returns its exit status.
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> Result<ExitStatus, LaunchError> {
        self.process.wait_for_exit(timeout).await
    }

    /// Sends SIGTERM and waits up to `timeout` for portcullis to exit.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, LaunchError> {
        self.process.send_sigterm()?;
        self.process.wait_for_exit(timeout).await
    }

    /// Returns the status of `GET /readyz` on the admin listener.
    pub async fn readiness_status(&self) -> Result<http::StatusCode, ClientError> {
        let response = send(self.admin_address, &HttpRequest::get("/readyz")).await?;
        Ok(response.status)
    }

    /// Parses every line of the audit file as JSON. A missing file counts as no events.
    pub fn audit_events(&self) -> Result<Vec<serde_json::Value>, LaunchError> {
        let text = match std::fs::read_to_string(&self.audit_path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(LaunchError::io(
                    format!("reading {}", self.audit_path.display()),
                    source,
                ));
            }
        };
        parse_audit_lines(&self.audit_path, &text)
    }

    /// Polls the audit file until it has at least `count` events or `timeout` passes, and
    /// returns all events. Fails when fewer than `count` arrive in time.
    pub async fn wait_for_audit_events(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<serde_json::Value>, LaunchError> {
        let started = Instant::now();
        loop {
            let events = self.audit_events()?;
            if events.len() >= count {
                return Ok(events);
            }
            if started.elapsed() >= timeout {
                return Err(LaunchError::MissingAuditEvents {
                    path: self.audit_path.clone(),
                    expected: count,
                    found: events.len(),
                    waited: timeout,
                });
            }
            tokio::time::sleep(AUDIT_POLL_INTERVAL).await;
        }
    }
}

/// Returns `portcullis` in the profile folder of the running test executable, which Cargo
/// places at `<target>/<profile>/deps/<test>-<hash>`.
fn binary_beside_test_executable() -> Result<PathBuf, LaunchError> {
    let test_executable = std::env::current_exe()
        .map_err(|source| LaunchError::io("locating the test executable", source))?;
    let deps_dir = test_executable.parent();
    let profile_dir = deps_dir
        .filter(|dir| dir.file_name().is_some_and(|name| name == "deps"))
        .and_then(Path::parent)
        .or(deps_dir)
        .unwrap_or(Path::new("."));
    Ok(profile_dir.join(format!("portcullis{}", std::env::consts::EXE_SUFFIX)))
}

async fn check_ready(admin_address: SocketAddr) -> Result<(), String> {
    let response = send(admin_address, &HttpRequest::get("/readyz"))
        .await
        .map_err(|error| error.to_string())?;
    if response.status != 200 {
        return Err(format!(
            "/readyz returned {} {:?}",
            response.status,
            response.body_text()
        ));
    }
    Ok(())
}

fn parse_audit_lines(path: &Path, text: &str) -> Result<Vec<serde_json::Value>, LaunchError> {
    let mut events = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let event =
            serde_json::from_str(line).map_err(|source| LaunchError::InvalidAuditEvent {
                path: path.to_path_buf(),
                line_number: index + 1,
                line: line.to_string(),
                source,
            })?;
        events.push(event);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_yaml_quotes_every_value() {
        let mut options = PortcullisOptions::new("/tmp/bundle \"x\"");
        options.reload_interval = Duration::from_millis(250);
        options.drain = Duration::from_secs(1);
        options.log_level = "debug".to_string();

        let yaml = config_yaml(
            &options,
            "127.0.0.1:9191".parse().expect("valid address"),
            "127.0.0.1:9192".parse().expect("valid address"),
            Path::new("/tmp/audit.jsonl"),
        );

        assert_eq!(
            yaml,
            r#"listen:
  address: "127.0.0.1:9191"
admin:
  address: "127.0.0.1:9192"
policy:
  bundle: "/tmp/bundle \"x\""
  decision: "envoy/authz/allow"
  reload_interval: "250ms"
audit:
  sink: file
  path: "/tmp/audit.jsonl"
log:
  level: "debug"
  format: text
shutdown:
  drain: "1000ms"
"#
        );
    }

    #[test]
    fn binary_is_looked_up_in_profile_folder() {
        let test_executable = std::env::current_exe().expect("current_exe failed");
        let profile_dir = test_executable
            .parent()
            .and_then(Path::parent)
            .expect("the test executable sits in <profile>/deps");

        let binary = binary_beside_test_executable().expect("locating the binary failed");

        assert_eq!(binary, profile_dir.join("portcullis"));
    }

    #[test]
    fn parse_audit_lines_skips_blank_lines() {
        let events = parse_audit_lines(Path::new("a.jsonl"), "{\"n\":1}\n\n{\"n\":2}\n")
            .expect("valid lines");

        assert_eq!(
            events,
            vec![serde_json::json!({"n": 1}), serde_json::json!({"n": 2})]
        );
    }

    #[test]
    fn parse_audit_lines_names_the_invalid_line() {
        let error = parse_audit_lines(Path::new("a.jsonl"), "{\"n\":1}\n{\"n\":\n")
            .expect_err("line 2 is invalid");

        assert!(
            matches!(error, LaunchError::InvalidAuditEvent { line_number: 2, .. }),
            "{error}"
        );
    }
}
