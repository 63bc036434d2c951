//! `portcullis inject`: the Kubernetes mutating admission webhook that adds the sidecar to
//! pods. The webhook itself lives in `portcullis-inject`; this only loads its configuration,
//! sets up logging and runs it until SIGTERM or SIGINT.

use std::path::Path;

use portcullis_inject::{InjectError, InjectorOptions};
use tracing::{error, info};

use crate::config::{LogConfig, LogFormat};
use crate::{EXIT_CONFIG, EXIT_FAILURE, logging, serve};

/// Runs the injector and returns the process exit code.
pub fn run(config_path: &Path) -> u8 {
    let options = match InjectorOptions::from_file(config_path) {
        Ok(options) => options,
        Err(error @ (InjectError::ReadConfig { .. } | InjectError::InvalidConfig { .. })) => {
            eprintln!("portcullis: {error}");
            return EXIT_CONFIG;
        }
        Err(error) => {
            eprintln!("portcullis: {error}");
            return EXIT_FAILURE;
        }
    };
    logging::init(&LogConfig { level: "info".to_owned(), format: LogFormat::Json });

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            error!(%error, "cannot start the async runtime");
            return EXIT_FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = async {
            let signal = serve::termination_signal().await;
            info!(signal, "stopping the injector");
        };
        match portcullis_inject::serve(options, shutdown).await {
            Ok(()) => 0,
            Err(error) => {
                error!(%error, "the injector failed");
                EXIT_FAILURE
            }
        }
    })
}
