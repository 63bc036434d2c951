//! Errors of the injector that stop it from starting or serving.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::ConfigProblem;

/// A failure to load the injector's settings or certificate, or to serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InjectError {
    #[error("reading injector configuration {path} failed: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("injector configuration {path} is invalid: {}", join_problems(.problems))]
    InvalidConfig {
        path: PathBuf,
        problems: Vec<ConfigProblem>,
    },
    #[error("reading TLS file {path} failed: {source}")]
    ReadTlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid TLS file {path}: {reason}")]
    InvalidTlsFile { path: PathBuf, reason: String },
    #[error("building the TLS server configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("binding the webhook listener {address} failed: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("accepting connections on {address} failed: {source}")]
    Accept {
        address: SocketAddr,
        source: std::io::Error,
    },
}

fn join_problems(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(ConfigProblem::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
