//! Envoy with the ext_authz HTTP filter in front of an upstream, checking with portcullis.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{ChildProcess, run_peer_script};
use crate::{HttpRequest, LaunchError, send};

/// Environment variable naming an Envoy binary to use instead of installing one.
pub const ENVOY_BINARY_VARIABLE: &str = "PORTCULLIS_ENVOY";

/// Maximum wait for Envoy to report LIVE. Its start takes about a second on a 2-core machine
/// when nothing else runs; the margin covers parallel tests and builds.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

const READY_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Settings of the generated Envoy bootstrap.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// Address of portcullis's ext_authz gRPC listener (HTTP/2 without TLS).
    pub authz_address: SocketAddr,
    /// Address of the HTTP/1.1 upstream that allowed requests are routed to.
    pub upstream_address: SocketAddr,
    /// Deadline of one ext_authz check, after which Envoy denies the request.
    pub check_timeout: Duration,
    /// Maximum bytes of request body that Envoy buffers and sends with the check.
    pub max_request_bytes: u32,
    /// mTLS to portcullis; `None` connects with cleartext HTTP/2.
    pub authz_tls: Option<EnvoyClientTls>,
    /// Whether requests pass the ext_authz filter. Without it Envoy only proxies, which is the
    /// baseline that benchmarks compare with.
    pub ext_authz: bool,
    /// Whether Envoy logs its ext_authz component at debug level: several lines per check,
    /// which tests read on failure and which benchmarks turn off because they cost CPU.
    pub ext_authz_debug_log: bool,
}

/// Envoy's client side of mTLS to portcullis: its certificate and the CA it trusts.
#[derive(Debug, Clone)]
pub struct EnvoyClientTls {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub ca_bundle: PathBuf,
    /// Sent as SNI and required as a DNS SAN of portcullis's certificate.
    pub server_name: String,
}

impl EnvoyOptions {
    /// Returns options with a 2 s check timeout and 8192 bytes of body sent with each check.
    ///
    /// The timeout is ten times Envoy's 200 ms default, because a debug build of portcullis on
    /// a loaded test machine can exceed the default.
    pub fn new(authz_address: SocketAddr, upstream_address: SocketAddr) -> Self {
        EnvoyOptions {
            authz_address,
            upstream_address,
            check_timeout: Duration::from_secs(2),
            max_request_bytes: 8192,
            authz_tls: None,
            ext_authz: true,
            ext_authz_debug_log: true,
        }
    }
}

/// Returns an Envoy bootstrap in YAML for `options`.
///
/// The listener and the admin interface bind 127.0.0.1 port 0; [`Envoy::start`] reads the
/// ports Envoy got, so no port can be taken between choosing and binding it. ext_authz runs
/// with `failure_mode_allow: false`, so an unreachable or failing portcullis denies with 403.
pub fn bootstrap_yaml(options: &EnvoyOptions) -> String {
    let authz_ip = options.authz_address.ip();
    let authz_port = options.authz_address.port();
    let upstream_ip = options.upstream_address.ip();
    let upstream_port = options.upstream_address.port();
    // Protobuf's Duration in JSON/YAML form takes seconds only, with up to 9 fraction digits.
    let check_timeout = format!(
        "{}.{:09}s",
        options.check_timeout.as_secs(),
        options.check_timeout.subsec_nanos()
    );
    let max_request_bytes = options.max_request_bytes;
    let authz_transport_socket = options.authz_tls.as_ref().map(transport_socket_yaml).unwrap_or_default();
    let ext_authz_filter = if options.ext_authz {
        format!(
            r#"          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              with_request_body:
                max_request_bytes: {max_request_bytes}
                allow_partial_message: true
                pack_as_bytes: true
              grpc_service:
                envoy_grpc:
                  cluster_name: portcullis
                timeout: {check_timeout}
"#
        )
    } else {
        String::new()
    };

    format!(
        r#"static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            name: local_route
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
          http_filters:
{ext_authz_filter}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: portcullis
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
{authz_transport_socket}    load_assignment:
      cluster_name: portcullis
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {authz_ip}, port_value: {authz_port} }}
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {upstream_ip}, port_value: {upstream_port} }}
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
"#
    )
}

/// Returns the `transport_socket` of the portcullis cluster for mTLS, indented for the
/// cluster's mapping. Envoy verifies that portcullis's certificate names `server_name`.
fn transport_socket_yaml(tls: &EnvoyClientTls) -> String {
    let path = |path: &Path| serde_json::Value::from(path.to_string_lossy()).to_string();
    let name = serde_json::Value::from(tls.server_name.as_str()).to_string();
    format!(
        r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {name}
        common_tls_context:
          alpn_protocols: ["h2"]
          tls_certificates:
          - certificate_chain: {{ filename: {certificate} }}
            private_key: {{ filename: {key} }}
          validation_context:
            trusted_ca: {{ filename: {ca} }}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{ exact: {name} }}
"#,
        certificate = path(&tls.certificate),
        key = path(&tls.private_key),
        ca = path(&tls.ca_bundle),
    )
}

/// Returns the Envoy binary: `PORTCULLIS_ENVOY` when set, else the one that
/// `tests/peers/envoy.sh` installs (running it at most once per test process).
///
/// Returns [`LaunchError::Unavailable`] when the install script fails, so that callers can skip.
pub fn envoy_binary() -> Result<PathBuf, LaunchError> {
    if let Some(path) = std::env::var_os(ENVOY_BINARY_VARIABLE) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(LaunchError::BinaryNotFound {
                name: "envoy",
                path,
                hint: format!("fix or unset {ENVOY_BINARY_VARIABLE}"),
            });
        }
        return Ok(path);
    }

    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    INSTALLED
        .get_or_init(install_envoy)
        .clone()
        .map_err(|reason| LaunchError::Unavailable {
            peer: "envoy",
            reason,
        })
}

fn install_envoy() -> Result<PathBuf, String> {
    let (path, stderr) = run_peer_script("envoy.sh")?;
    if path.as_os_str().is_empty() {
        return Err(format!("envoy.sh printed no binary path; stderr: {stderr}"));
    }
    Ok(path)
}

/// A running Envoy, killed when dropped.
pub struct Envoy {
    process: ChildProcess,
    listener_address: SocketAddr,
    admin_address: SocketAddr,
    // Holds the bootstrap and the log until Envoy is gone.
    _work_dir: TempDir,
}

impl Envoy {
    /// Writes the bootstrap from `options`, starts `binary` and waits until the admin
    /// interface reports LIVE and the listener's port is known.
    pub async fn start(binary: &Path, options: &EnvoyOptions) -> Result<Self, LaunchError> {
        let work_dir = tempfile::Builder::new()
            .prefix("portcullis-envoy-")
            .tempdir()
            .map_err(|source| LaunchError::io("creating Envoy's work folder", source))?;
        let bootstrap_path = work_dir.path().join("envoy.yaml");
        let admin_address_path = work_dir.path().join("admin-address.txt");
        let log_path = work_dir.path().join("envoy.log");
        std::fs::write(&bootstrap_path, bootstrap_yaml(options)).map_err(|source| {
            LaunchError::io(format!("writing {}", bootstrap_path.display()), source)
        })?;

        let mut command = Command::new(binary);
        command
            .arg("--config-path")
            .arg(&bootstrap_path)
            .arg("--admin-address-path")
            .arg(&admin_address_path)
            // Several Envoys run at once in parallel tests; hot restart would make them share
            // one shared-memory region.
            .arg("--disable-hot-restart")
            .args(["--concurrency", "1"])
            // Info level starts with hundreds of lines listing extensions, which would push
            // the useful lines out of the log tail shown in errors.
            .args(["--log-level", "warning"]);
        if options.ext_authz_debug_log {
            command.args(["--component-log-level", "ext_authz:debug"]);
        }
        let mut process = ChildProcess::spawn("envoy", &mut command, &log_path, &log_path)?;

        let (admin_address, listener_address) = process
            .wait_until_ready(READY_TIMEOUT, READY_POLL_INTERVAL, || {
                check_live(&admin_address_path)
            })
            .await?;
        Ok(Envoy {
            process,
            listener_address,
            admin_address,
            _work_dir: work_dir,
        })
    }

    /// Address of the HTTP listener that clients send requests to.
    pub fn listener_address(&self) -> SocketAddr {
        self.listener_address
    }

    pub fn admin_address(&self) -> SocketAddr {
        self.admin_address
    }

    /// Returns the last lines of Envoy's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

/// Returns the admin and listener addresses once Envoy has written its admin address,
/// `/ready` returns LIVE and the listener has a port.
async fn check_live(admin_address_path: &Path) -> Result<(SocketAddr, SocketAddr), String> {
    let admin_text = std::fs::read_to_string(admin_address_path)
        .map_err(|error| format!("reading {}: {error}", admin_address_path.display()))?;
    let admin_address: SocketAddr = admin_text
        .trim()
        .parse()
        .map_err(|error| format!("admin address {:?} is invalid: {error}", admin_text.trim()))?;

    let ready = send(admin_address, &HttpRequest::get("/ready"))
        .await
        .map_err(|error| error.to_string())?;
    let ready_text = ready.body_text();
    if ready.status != 200 || ready_text.trim() != "LIVE" {
        return Err(format!(
            "/ready returned {} {:?}",
            ready.status,
            ready_text.trim()
        ));
    }

    let listeners = send(admin_address, &HttpRequest::get("/listeners?format=json"))
        .await
        .map_err(|error| error.to_string())?;
    let listener_address = parse_listener_address(&listeners.body)?;
    Ok((admin_address, listener_address))
}

/// Reads the bound address of the first listener from the admin `/listeners?format=json`
/// output, which has the shape
/// `{"listener_statuses":[{"local_address":{"socket_address":{"address":..,"port_value":..}}}]}`.
fn parse_listener_address(json: &[u8]) -> Result<SocketAddr, String> {
    let value: serde_json::Value = serde_json::from_slice(json)
        .map_err(|error| format!("/listeners returned invalid JSON: {error}"))?;
    let socket_address = &value["listener_statuses"][0]["local_address"]["socket_address"];
    let ip = socket_address["address"].as_str();
    let port = socket_address["port_value"]
        .as_u64()
        .and_then(|port| u16::try_from(port).ok());
    match (ip, port) {
        (Some(ip), Some(port)) if port != 0 => format!("{ip}:{port}")
            .parse()
            .map_err(|error| format!("listener address {ip}:{port} is invalid: {error}")),
        _ => Err(format!(
            "/listeners has no bound listener address: {}",
            String::from_utf8_lossy(json)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_listener_address_reads_first_listener() {
        let json = br#"{"listener_statuses":[{"name":"ingress","local_address":{"socket_address":{"address":"127.0.0.1","port_value":43437}}}]}"#;

        let address = parse_listener_address(json).expect("parse_listener_address failed");

        assert_eq!(
            address,
            "127.0.0.1:43437"
                .parse::<SocketAddr>()
                .expect("valid address")
        );
    }

    #[test]
    fn parse_listener_address_rejects_unbound_port() {
        let json = br#"{"listener_statuses":[{"local_address":{"socket_address":{"address":"127.0.0.1","port_value":0}}}]}"#;

        let error = parse_listener_address(json).expect_err("port 0 is not bound yet");

        assert!(
            error.starts_with("/listeners has no bound listener address"),
            "{error}"
        );
    }

    #[test]
    fn parse_listener_address_rejects_invalid_json() {
        let error = parse_listener_address(b"not json").expect_err("invalid JSON must be rejected");

        assert!(
            error.starts_with("/listeners returned invalid JSON"),
            "{error}"
        );
    }

    #[test]
    fn bootstrap_uses_given_addresses() {
        let options = EnvoyOptions::new(
            "127.0.0.1:9191".parse().expect("valid address"),
            "127.0.0.1:8081".parse().expect("valid address"),
        );

        let yaml = bootstrap_yaml(&options);

        assert!(
            yaml.contains("socket_address: { address: 127.0.0.1, port_value: 9191 }"),
            "{yaml}"
        );
        assert!(
            yaml.contains("socket_address: { address: 127.0.0.1, port_value: 8081 }"),
            "{yaml}"
        );
        assert!(yaml.contains("failure_mode_allow: false"), "{yaml}");
        assert!(yaml.contains("max_request_bytes: 8192"), "{yaml}");
        assert!(yaml.contains("timeout: 2.000000000s"), "{yaml}");
    }
}
