//! The configuration file: one YAML document read into [`Config`], with every problem
//! reported by key path and line. `docs/configuration.md` documents each key.

mod audit;
mod fields;
mod jwt;
pub mod kafka;
mod tls;
mod yaml;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use audit::{AuditConfig, AuditMode};
pub use fields::Problem;
pub use jwt::JwtConfig;
pub use tls::{TlsConfig, TlsSource};
use fields::{Fields, problem};

/// Default size limit of one gRPC message. A CheckRequest carries the request headers and
/// at most the buffered body (Envoy's `with_request_body.max_request_bytes`); 4 MiB is gRPC's
/// usual default and leaves room for a 1 MiB body with headers.
const DEFAULT_MAX_MESSAGE_BYTES: u64 = 4 * 1024 * 1024;
/// Largest message size accepted in configuration.
const MAX_MESSAGE_BYTES: u64 = 64 * 1024 * 1024;
/// How often the bundle is checked for changes: fast enough that a ConfigMap update takes
/// effect within seconds, rare enough that hashing a bundle costs nothing measurable.
const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// How long checks are still answered after SIGTERM while endpoints drain: long enough for
/// Kubernetes to remove the pod from load balancing (a few seconds in practice).
const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
/// How long in-flight checks may take to finish after the drain before the process exits.
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_DECISION: &str = "envoy/authz/allow";

/// The whole configuration of `portcullis serve`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: ListenConfig,
    pub admin: AdminConfig,
    pub policy: PolicyConfig,
    pub audit: AuditConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    /// Token verification; `None` when no provider is configured.
    pub jwt: Option<JwtConfig>,
    /// mTLS on the ext_authz TCP listener; `None` serves cleartext HTTP/2.
    pub tls: Option<TlsConfig>,
}

/// Listeners for ext_authz gRPC checks.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenConfig {
    pub address: Option<SocketAddr>,
    pub unix_socket: Option<PathBuf>,
    pub max_message_bytes: usize,
}

/// The admin HTTP listener: health, readiness and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub address: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// A bundle folder or an OPA bundle `.tar.gz`.
    pub bundle: PathBuf,
    /// Slash-separated path of the decision rule under `data`, as the OPA Envoy plugin's `path`.
    pub decision: String,
    /// Zero turns reloading off.
    pub reload_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// A `tracing` filter: a level (`info`) or directives (`info,portcullis_policy=debug`).
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShutdownConfig {
    pub drain: Duration,
    pub timeout: Duration,
}

/// Failure to read or validate a configuration file.
#[derive(Debug)]
pub enum ConfigError {
    Read { path: PathBuf, error: std::io::Error },
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, error } => write!(f, "cannot read configuration file {}: {error}", path.display()),
            ConfigError::Invalid { path, problems } => {
                let count = problems.len();
                write!(f, "configuration file {} has {count} problem{}:", path.display(), if count == 1 { "" } else { "s" })?;
                for problem in problems {
                    write!(f, "\n  {problem}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a configuration file. Relative paths inside it are taken from
    /// the file's folder, so a configuration works from any working directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_owned(), error })?;
        let base_dir = path.parent().unwrap_or(Path::new(""));
        Config::parse(&text, base_dir).map_err(|problems| ConfigError::Invalid { path: path.to_owned(), problems })
    }

    /// Parses configuration text; relative paths are joined to `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, Vec<Problem>> {
        let root = match yaml::parse(text) {
            Ok(root) => root,
            Err(error) => return Err(vec![problem("", Some(error.line), error.to_string())]),
        };

        let mut problems = Vec::new();
        let top = Fields::new(Some(&root), "", &["listen", "admin", "policy", "audit", "log", "shutdown", "jwt", "tls", "vault"], base_dir, &mut problems);
        let config = Config {
            listen: read_listen(&top, base_dir, &mut problems),
            admin: read_admin(&top, base_dir, &mut problems),
            policy: read_policy(&top, base_dir, &mut problems),
            audit: audit::read_audit(top.node("audit"), base_dir, &mut problems),
            log: read_log(&top, base_dir, &mut problems),
            shutdown: read_shutdown(&top, base_dir, &mut problems),
            jwt: jwt::read_jwt(top.node("jwt"), base_dir, &mut problems),
            tls: tls::read_tls(top.node("tls"), top.node("vault"), top.line_of("vault"), base_dir, &mut problems),
        };
        let listener_certificate_requested = config.audit.kafka.as_ref().and_then(|kafka| kafka.connection.tls.as_ref()).is_some_and(|tls| tls.rotating_certificate.is_some());
        if listener_certificate_requested && config.tls.is_none() {
            let line = top.node("audit").map(|node| node.line);
            problems.push(problem("audit.kafka.tls.use_listener_certificate", line, "needs the `tls` section, whose certificate it reuses; add `tls` or set cert_file and key_file".to_owned()));
        }
        // The verifier's own checks (unique names, usable key files, secret lengths) run only
        // on an otherwise valid file, so one mistake is not reported twice.
        if problems.is_empty()
            && let Some(jwt) = &config.jwt
            && let Err(error) = portcullis_jwt::Verifier::new(jwt.verifier.clone())
        {
            for reported in &error.problems {
                problems.push(problem("jwt", top.line_of("jwt"), reported.to_string()));
            }
        }
        if problems.is_empty() { Ok(config) } else { Err(problems) }
    }
}

fn read_listen(top: &Fields<'_>, base_dir: &Path, problems: &mut Vec<Problem>) -> ListenConfig {
    let fields = Fields::new(top.node("listen"), "listen", &["address", "unix_socket", "max_message_bytes"], base_dir, problems);
    let listen = ListenConfig {
        address: fields.socket_address("address", problems),
        unix_socket: fields.path("unix_socket", problems),
        max_message_bytes: fields.integer("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES, 1024..=MAX_MESSAGE_BYTES, problems) as usize,
    };
    let address_given = fields.node("address").is_some();
    let socket_given = fields.node("unix_socket").is_some();
    if !address_given && !socket_given {
        problems.push(problem("listen", top.node("listen").map(|node| node.line), "no listener: set listen.address, listen.unix_socket or both".to_owned()));
    }
    listen
}

fn read_admin(top: &Fields<'_>, base_dir: &Path, problems: &mut Vec<Problem>) -> AdminConfig {
    let fields = Fields::new(top.node("admin"), "admin", &["address"], base_dir, problems);
    AdminConfig { address: fields.socket_address("address", problems) }
}

fn read_policy(top: &Fields<'_>, base_dir: &Path, problems: &mut Vec<Problem>) -> PolicyConfig {
    let fields = Fields::new(top.node("policy"), "policy", &["bundle", "decision", "reload_interval"], base_dir, problems);
    let bundle = fields.path("bundle", problems);
    match &bundle {
        None if fields.node("bundle").is_none() => {
            problems.push(problem("policy.bundle", top.node("policy").map(|node| node.line), "missing; set it to a bundle folder or .tar.gz".to_owned()));
        }
        Some(path) if !path.exists() => problems.push(problem(
            "policy.bundle",
            fields.line_of("bundle"),
            format!("{} not found; set it to a bundle folder or .tar.gz", path.display()),
        )),
        _ => {}
    }

    let decision = fields.string("decision", problems).unwrap_or_else(|| DEFAULT_DECISION.to_owned());
    if let Err(message) = check_decision_path(&decision) {
        problems.push(problem("policy.decision", fields.line_of("decision"), message));
    }

    PolicyConfig {
        bundle: bundle.unwrap_or_default(),
        decision,
        reload_interval: fields.duration("reload_interval", DEFAULT_RELOAD_INTERVAL, Duration::from_secs(24 * 3600), problems),
    }
}

/// Checks a decision path such as `envoy/authz/allow`: slash-separated Rego identifiers,
/// relative to `data`.
fn check_decision_path(decision: &str) -> Result<(), String> {
    let valid_segment = |segment: &str| {
        let mut chars = segment.chars();
        chars.next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let trimmed = decision.trim_matches('/');
    if trimmed.is_empty() || !trimmed.split('/').all(valid_segment) {
        return Err(format!(
            "invalid decision path {decision:?}; expected Rego names separated by '/', such as envoy/authz/allow"
        ));
    }
    if trimmed == "data" || trimmed.starts_with("data/") {
        return Err(format!("decision path {decision:?} must not start with data/; it is already relative to data"));
    }
    Ok(())
}

fn read_log(top: &Fields<'_>, base_dir: &Path, problems: &mut Vec<Problem>) -> LogConfig {
    let fields = Fields::new(top.node("log"), "log", &["level", "format"], base_dir, problems);
    let level = fields.string("level", problems).unwrap_or_else(|| "info".to_owned());
    if let Err(message) = check_log_level(&level) {
        problems.push(problem("log.level", fields.line_of("level"), message));
    }
    let format = match fields.choice("format", &["text", "json"], "text", problems).as_str() {
        "json" => LogFormat::Json,
        _ => LogFormat::Text,
    };
    LogConfig { level, format }
}

/// Checks a log filter: a plain level, or `tracing` directives such as `info,hyper=warn`.
/// A bare word that is not a level would parse as a target name and silence every log,
/// so it is rejected.
fn check_log_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let expected = "use trace, debug, info, warn, error or off, or directives such as info,hyper=warn";
    for directive in level.split(',').map(str::trim) {
        let is_level = LEVELS.contains(&directive.to_ascii_lowercase().as_str());
        if !is_level && !directive.contains('=') {
            return Err(format!("invalid log level {directive:?} in {level:?}; {expected}"));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(level)
        .map(|_| ())
        .map_err(|error| format!("invalid log level {level:?}: {error}; {expected}"))
}

fn read_shutdown(top: &Fields<'_>, base_dir: &Path, problems: &mut Vec<Problem>) -> ShutdownConfig {
    let fields = Fields::new(top.node("shutdown"), "shutdown", &["drain", "timeout"], base_dir, problems);
    let hour = Duration::from_secs(3600);
    ShutdownConfig {
        drain: fields.duration("drain", DEFAULT_DRAIN, hour, problems),
        timeout: fields.duration("timeout", DEFAULT_SHUTDOWN_TIMEOUT, hour, problems),
    }
}

#[cfg(test)]
mod tests;
