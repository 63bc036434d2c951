//! Structured logs with `tracing`, to standard error so that standard output stays free
//! for decision events.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Environment variable that overrides `log.level`, for debugging a running configuration.
const LOG_ENV: &str = "PORTCULLIS_LOG";

/// Vault client libraries that log an error line of their own for every failed Vault request,
/// which portcullis already logs with the context an operator needs. Directives that name
/// these targets turn them back on.
const QUIET_TARGETS: &[&str] = &["rustify", "vaultrs"];

/// Installs the global subscriber. `PORTCULLIS_LOG` wins over the configured level.
pub fn init(config: &LogConfig) {
    let directives = std::env::var(LOG_ENV)
        .ok()
        .filter(|directives| EnvFilter::builder().parse(directives).is_ok())
        .unwrap_or_else(|| config.level.clone());
    let mut filter = EnvFilter::builder().parse(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    for target in QUIET_TARGETS.iter().filter(|target| !directives.contains(*target)) {
        if let Ok(directive) = format!("{target}=off").parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if let Err(error) = installed {
        eprintln!("portcullis: logging was already set up: {error}");
    }
}
