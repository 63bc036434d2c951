//! Launchers for end-to-end tests: a recording HTTP upstream, Envoy configured with the
//! ext_authz filter, the portcullis binary, Keycloak as an OIDC issuer, and a small HTTP client
//! to send requests through Envoy.
//!
//! Every server binds to 127.0.0.1 only. Child processes are killed when their launcher is
//! dropped, and their output goes to files whose last lines appear in every launch error.

mod bundle;
mod client;
mod envoy;
mod error;
pub mod kafka;
mod keycloak;
mod portcullis;
mod process;
mod upstream;
pub mod vault;

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;

pub use bundle::write_bundle;
pub use client::{ClientError, HttpRequest, HttpResponse, send};
pub use envoy::{
    ENVOY_BINARY_VARIABLE, Envoy, EnvoyClientTls, EnvoyOptions, bootstrap_yaml, envoy_binary,
};
pub use error::LaunchError;
pub use keycloak::{
    KEYCLOAK_ADMIN_PASSWORD, KEYCLOAK_ADMIN_USER, KEYCLOAK_JAVA_HOME_VARIABLE, Keycloak,
    KeycloakError, java_home, keycloak_home,
};
pub use portcullis::{PORTCULLIS_BINARY_VARIABLE, Portcullis, PortcullisOptions, config_yaml};
pub use upstream::{RecordedRequest, UPSTREAM_BODY, Upstream};

/// Environment variable that turns a missing peer (such as Envoy) from a skip into a failure.
pub const REQUIRE_PEERS_VARIABLE: &str = "PORTCULLIS_REQUIRE_PEERS";

/// Returns a TCP port on 127.0.0.1 that was free when this function returned.
///
/// NOTE: another process can take the port before the caller binds it. Prefer binding port 0
/// where the server can report the port it got.
pub fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Returns 127.0.0.1 with a port from [`free_port`].
pub fn free_loopback_address() -> io::Result<SocketAddr> {
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))
}

/// Whether `PORTCULLIS_REQUIRE_PEERS=1` is set, so that a test must fail instead of skipping
/// when a peer cannot be installed.
pub fn peers_required() -> bool {
    std::env::var(REQUIRE_PEERS_VARIABLE).is_ok_and(|value| value == "1")
}

/// Writes `SKIPPED: {test}: {reason}` to the process's stderr.
///
/// The line is written to the stderr handle instead of through `eprintln!`, because libtest
/// captures `eprintln!` output of passing tests and the skip would go unseen.
pub fn report_skip(test: &str, reason: &str) {
    let line =
        format!("SKIPPED: {test}: {reason} (set {REQUIRE_PEERS_VARIABLE}=1 to fail instead)\n");
    // A failed write to stderr leaves nothing better to report to.
    let _ = io::stderr().write_all(line.as_bytes());
}

/// Returns the Envoy binary, or `None` after reporting a skip when Envoy cannot be installed.
///
/// Panics when Envoy cannot be installed and [`peers_required`] is true, or when
/// `PORTCULLIS_ENVOY` names a missing file.
pub fn envoy_binary_or_skip(test: &str) -> Option<PathBuf> {
    match envoy_binary() {
        Ok(path) => Some(path),
        Err(LaunchError::Unavailable { peer, reason }) if !peers_required() => {
            report_skip(test, &format!("{peer} is not available: {reason}"));
            None
        }
        Err(error) => panic!("{test}: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_can_be_bound_on_loopback() {
        let port = free_port().expect("free_port failed");

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port));

        assert!(
            listener.is_ok(),
            "binding 127.0.0.1:{port} failed: {listener:?}"
        );
    }
}
