//! Structured logs with `tracing`, to standard error so that standard output stays free
//! for decision events.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Environment variable that overrides `log.level`, for debugging a running configuration.
const LOG_ENV: &str = "PORTCULLIS_LOG";

/// Installs the global subscriber. `PORTCULLIS_LOG` wins over the configured level.
pub fn init(config: &LogConfig) {
    let filter = std::env::var(LOG_ENV)
        .ok()
        .and_then(|directives| EnvFilter::builder().parse(directives).ok())
        .or_else(|| EnvFilter::builder().parse(&config.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
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
