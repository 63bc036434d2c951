//! portcullis: an authorization sidecar that decides Envoy ext_authz checks with Rego policy.
//!
//! This binary only wires the crates together: configuration, listeners, the admin
//! endpoint, signals and the offline tools.

mod admin;
mod audit;
mod check;
mod config;
mod inject;
mod listener;
mod logging;
mod metrics;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for an invalid configuration file (EX_CONFIG from sysexits.h).
pub const EXIT_CONFIG: u8 = 78;
/// Exit code for a policy bundle that cannot be loaded or compiled (EX_DATAERR).
pub const EXIT_BUNDLE: u8 = 65;
/// Exit code for any other failure at start-up or while running.
pub const EXIT_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Authorization sidecar for Envoy and Istio: decides ext_authz gRPC checks with Rego policy",
    long_about = "Authorization sidecar for Envoy and Istio.\n\n\
        portcullis answers Envoy's ext_authz v3 gRPC checks: it turns each CheckRequest into \
        the input document of the OPA Envoy plugin, evaluates a local Rego bundle in-process, \
        records one decision event per check, and only then answers allow or deny.\n\n\
        Start with the bundled local setup:\n  \
        portcullis serve --config deploy/local/portcullis.yaml\n\n\
        Exit codes: 0 success, 1 failure (for audit verify: a problem found), 2 bad command line, \
        64 unreadable key or input, 65 invalid policy bundle, 78 invalid configuration.",
    after_help = "Configuration keys are documented in docs/configuration.md; the policy input in docs/input.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar: decide ext_authz checks until SIGTERM or SIGINT.
    Serve {
        /// The YAML configuration file.
        #[arg(long, short, value_name = "FILE", env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Decide one CheckRequest offline and print the input document, the decision and the
    /// response that `serve` would send. Records no decision event. Exits 1 when the policy
    /// fails to evaluate or returns a malformed decision.
    Check {
        /// The YAML configuration file; its policy section is used.
        #[arg(long, short, value_name = "FILE", env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// A CheckRequest in protobuf JSON (`{"attributes": {"request": {"http": {...}}}}`).
        #[arg(long, short, value_name = "FILE.json")]
        request: PathBuf,
    },
    /// Run the Kubernetes admission webhook that injects the portcullis sidecar into pods
    /// (AdmissionReview v1 over TLS). The Helm chart in charts/portcullis deploys it.
    Inject {
        /// The injector's YAML configuration file (see docs/helm.md).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Work with the audit chain: create a checkpoint signing key, verify records.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Write a new Ed25519 key pair for signing audit checkpoints. The private key file is
    /// created with mode 0600; existing files are never overwritten.
    Keygen {
        /// Output file for the private key (PKCS#8 PEM); point audit.checkpoint.signing_key_file at it.
        #[arg(long, value_name = "FILE")]
        private_key: PathBuf,
        /// Output file for the public key (SubjectPublicKeyInfo PEM), for `audit verify`.
        #[arg(long, value_name = "FILE")]
        public_key: PathBuf,
    },
    /// Verify the hash chains and signed checkpoints of audit records, and name the first
    /// problem of each instance's chain. Exits 0 when every chain is whole, 1 when a problem
    /// is found, 64 when a key or input cannot be read.
    Verify {
        /// Public key that signs checkpoints (PEM); repeat for keys of earlier rotations.
        #[arg(long, value_name = "FILE", required = true)]
        public_key: Vec<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Kafka brokers (HOST:PORT, comma-separated) to read `--topic` from, over plaintext.
        #[arg(long, value_name = "HOST:PORT", requires = "topic")]
        kafka_bootstrap: Option<String>,
        /// Kafka topic to verify: every partition from its earliest offset up to its end when
        /// the command starts.
        #[arg(long, value_name = "NAME", requires = "kafka_bootstrap")]
        topic: Option<String>,
        /// JSON-lines files of records, or spool folders.
        #[arg(value_name = "PATH", required_unless_present = "kafka_bootstrap")]
        paths: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Report every problem in a configuration file by key path and line, and check that
    /// its policy bundle loads and compiles. Exits 78 when the file is invalid.
    Validate {
        /// The YAML configuration file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve { config } => serve::run(&config),
        Command::Check { config, request } => check::run(&config, &request),
        Command::Inject { config } => inject::run(&config),
        Command::Config { command: ConfigCommand::Validate { file } } => check::validate(&file),
        Command::Audit { command: AuditCommand::Keygen { private_key, public_key } } => audit::keygen(&private_key, &public_key),
        Command::Audit { command: AuditCommand::Verify { public_key, json, kafka_bootstrap, topic, paths } } => {
            let mut sources: Vec<audit::RecordSource> = paths.iter().map(|path| audit::RecordSource::from_path(path)).collect();
            if let (Some(bootstrap_servers), Some(topic)) = (kafka_bootstrap, topic) {
                sources.push(audit::RecordSource::Kafka { bootstrap_servers, topic });
            }
            audit::verify(&public_key, json, &sources)
        }
    };
    ExitCode::from(code)
}
