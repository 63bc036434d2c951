//! Keycloak 26 on 127.0.0.1 as a real OIDC issuer: started in dev mode with an in-memory
//! database and one imported realm, with helpers to request tokens and to rotate realm keys
//! through the admin REST API.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::process::{ChildProcess, run_peer_script};
use crate::{ClientError, HttpRequest, LaunchError, free_loopback_address, send};

/// Environment variable naming a Java home (Java 21 or newer) to run Keycloak with.
pub const KEYCLOAK_JAVA_HOME_VARIABLE: &str = "KEYCLOAK_JAVA_HOME";

/// User and password of the bootstrap administrator in the `master` realm. Test-only values for
/// a Keycloak that listens on 127.0.0.1 and keeps its data in memory.
pub const KEYCLOAK_ADMIN_USER: &str = "admin";
pub const KEYCLOAK_ADMIN_PASSWORD: &str = "test-only-admin-password";

/// Lowest Java major version that runs Keycloak 26.
const MIN_JAVA_VERSION: u32 = 21;

/// Maximum wait for the realm's discovery document. Keycloak 26.5 in dev mode took about 15 s to
/// start on an idle 2-core machine. The margin covers parallel builds and the first start, which
/// also builds Keycloak's Quarkus application.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

const READY_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Time Keycloak gets to stop after SIGTERM before its process group is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Failure of a request to a running Keycloak.
#[derive(Debug, thiserror::Error)]
pub enum KeycloakError {
    #[error("{action} failed: {source}")]
    Request {
        action: String,
        #[source]
        source: ClientError,
    },

    #[error("{action} returned {status}: {body}")]
    Status {
        action: String,
        status: StatusCode,
        body: String,
    },

    #[error("{action} returned an invalid response: {reason}; body: {body}")]
    InvalidResponse {
        action: String,
        reason: String,
        body: String,
    },
}

/// A running Keycloak; its whole process group is stopped when dropped.
pub struct Keycloak {
    process: ChildProcess,
    address: SocketAddr,
    realm: String,
    // Holds the log until Keycloak is gone.
    _work_dir: TempDir,
}

impl Keycloak {
    /// Installs Keycloak with `tests/peers/keycloak.sh` (once per test process), imports
    /// `realm_file` (a realm export whose `realm` field names the realm), starts `kc.sh
    /// start-dev` on a free loopback port and waits until the realm's discovery document is
    /// served.
    ///
    /// Returns [`LaunchError::Unavailable`] when Keycloak cannot be installed or no Java 21 or
    /// newer is found, so that callers can skip.
    pub async fn start(realm_file: &Path) -> Result<Self, LaunchError> {
        let home = keycloak_home()?;
        let java_home = java_home().ok_or_else(|| LaunchError::Unavailable {
            peer: "keycloak",
            reason: format!(
                "no Java {MIN_JAVA_VERSION} or newer found in {KEYCLOAK_JAVA_HOME_VARIABLE}, \
                 JAVA_HOME or /usr/lib/jvm"
            ),
        })?;
        let realm = import_realm(&home, realm_file)?;

        let work_dir = tempfile::Builder::new()
            .prefix("portcullis-keycloak-")
            .tempdir()
            .map_err(|source| LaunchError::io("creating Keycloak's work folder", source))?;
        let address = free_loopback_address()
            .map_err(|source| LaunchError::io("finding a free port for Keycloak", source))?;
        let management_address = free_loopback_address().map_err(|source| {
            LaunchError::io(
                "finding a free port for Keycloak's management interface",
                source,
            )
        })?;
        let mut command = Command::new(home.join("bin").join("kc.sh"));
        command
            .arg("start-dev")
            .arg(format!("--http-port={}", address.port()))
            .arg("--http-host=127.0.0.1")
            .arg(format!(
                "--http-management-port={}",
                management_address.port()
            ))
            .arg("--db=dev-mem")
            .arg("--import-realm")
            .env("JAVA_HOME", &java_home)
            .env("KC_BOOTSTRAP_ADMIN_USERNAME", KEYCLOAK_ADMIN_USER)
            .env("KC_BOOTSTRAP_ADMIN_PASSWORD", KEYCLOAK_ADMIN_PASSWORD)
            // kc.sh runs Java as a background child, so stopping Keycloak means signalling the
            // whole group.
            .process_group(0);
        let log_path = work_dir.path().join("keycloak.log");
        let mut process = ChildProcess::spawn("keycloak", &mut command, &log_path, &log_path)?;

        let discovery_path = format!("/realms/{realm}/.well-known/openid-configuration");
        let started = Instant::now();
        process
            .wait_until_ready(READY_TIMEOUT, READY_POLL_INTERVAL, || {
                check_discovery(address, &discovery_path)
            })
            .await?;
        report_progress(&format!(
            "Keycloak ready on {address} after {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        Ok(Keycloak {
            process,
            address,
            realm,
            _work_dir: work_dir,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Name of the imported realm.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Returns the imported realm's issuer, `http://127.0.0.1:PORT/realms/REALM`, as it
    /// appears in the `iss` claim of its tokens.
    pub fn issuer(&self) -> String {
        format!("http://{}/realms/{}", self.address, self.realm)
    }

    /// Returns the last lines of Keycloak's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Requests an access token from the imported realm with the client credentials grant.
    pub async fn client_credentials_token(
        &self,
        client_id: &str,
        client_secret: &str,
    ) -> Result<String, KeycloakError> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", client_secret),
        ];
        self.token(&self.realm, &form).await
    }

    /// Requests an access token from the imported realm with the resource owner password
    /// grant, which the client must allow (`directAccessGrantsEnabled`).
    pub async fn password_token(
        &self,
        client_id: &str,
        client_secret: &str,
        username: &str,
        password: &str,
    ) -> Result<String, KeycloakError> {
        let form = [
            ("grant_type", "password"),
            ("client_id", client_id),
            ("client_secret", client_secret),
            ("username", username),
            ("password", password),
        ];
        self.token(&self.realm, &form).await
    }

    /// Adds a generated RSA key provider with a higher priority than the realm's original
    /// `rsa-generated` provider, then disables the original. New tokens then carry a new `kid`,
    /// and the old key leaves the realm's JWKS.
    pub async fn rotate_signing_key(&self) -> Result<(), KeycloakError> {
        let realm = self.admin_request(Method::GET, "", None).await?;
        let realm_id = required_string(&realm, "id", "GET the realm")?;
        let components = self
            .admin_request(
                Method::GET,
                "/components?type=org.keycloak.keys.KeyProvider",
                None,
            )
            .await?;
        let original = components
            .as_array()
            .and_then(|components| {
                components
                    .iter()
                    .find(|component| component["providerId"] == "rsa-generated")
            })
            .cloned()
            .ok_or_else(|| KeycloakError::InvalidResponse {
                action: "GET the realm's key providers".to_string(),
                reason: "no component with providerId rsa-generated".to_string(),
                body: components.to_string(),
            })?;
        let original_id = required_string(&original, "id", "GET the realm's key providers")?;

        let rotated = json!({
            "name": "rotated-rsa",
            "providerId": "rsa-generated",
            "providerType": "org.keycloak.keys.KeyProvider",
            "parentId": realm_id,
            "config": {"priority": ["200"], "keySize": ["2048"], "algorithm": ["RS256"]},
        });
        self.admin_request(Method::POST, "/components", Some(rotated))
            .await?;

        let mut disabled = original;
        disabled["config"]["enabled"] = json!(["false"]);
        self.admin_request(
            Method::PUT,
            &format!("/components/{original_id}"),
            Some(disabled),
        )
        .await?;
        Ok(())
    }

    /// Sends a request to the admin REST API of the imported realm (`/admin/realms/REALM` +
    /// `path`) with a fresh admin token, and returns the JSON response (`null` when empty).
    pub async fn admin_request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, KeycloakError> {
        let admin_form = [
            ("grant_type", "password"),
            ("client_id", "admin-cli"),
            ("username", KEYCLOAK_ADMIN_USER),
            ("password", KEYCLOAK_ADMIN_PASSWORD),
        ];
        let admin_token = self.token("master", &admin_form).await?;

        let target = format!("/admin/realms/{}{path}", self.realm);
        let action = format!("{method} {target}");
        let mut request = HttpRequest::new(method, target)
            .with_header("authorization", format!("Bearer {admin_token}"));
        if let Some(body) = body {
            request = request
                .with_header("content-type", "application/json")
                .with_body(body.to_string());
        }
        let text = self.exchange(&action, &request).await?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|error| KeycloakError::InvalidResponse {
            action,
            reason: format!("not JSON: {error}"),
            body: text,
        })
    }

    /// Posts `form` to the token endpoint of `realm` and returns the `access_token`.
    async fn token(&self, realm: &str, form: &[(&str, &str)]) -> Result<String, KeycloakError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let target = format!("/realms/{realm}/protocol/openid-connect/token");
        let action = format!("POST {target}");
        let request = HttpRequest::post(target, body)
            .with_header("content-type", "application/x-www-form-urlencoded");
        let text = self.exchange(&action, &request).await?;

        let document: Value =
            serde_json::from_str(&text).map_err(|error| KeycloakError::InvalidResponse {
                action: action.clone(),
                reason: format!("not JSON: {error}"),
                body: text.clone(),
            })?;
        required_string(&document, "access_token", &action)
    }

    /// Sends `request` and returns the body of a 2xx response.
    async fn exchange(&self, action: &str, request: &HttpRequest) -> Result<String, KeycloakError> {
        let response =
            send(self.address, request)
                .await
                .map_err(|source| KeycloakError::Request {
                    action: action.to_string(),
                    source,
                })?;
        let text = response.body_text();
        if !response.status.is_success() {
            return Err(KeycloakError::Status {
                action: action.to_string(),
                status: response.status,
                body: text,
            });
        }
        Ok(text)
    }
}

impl Drop for Keycloak {
    fn drop(&mut self) {
        let Ok(raw_pid) = i32::try_from(self.process.id()) else {
            return;
        };
        let group = Pid::from_raw(raw_pid);
        // Errors mean the group is already gone, which is what Drop wants.
        if killpg(group, Signal::SIGTERM).is_err() {
            return;
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        // Signal 0 only checks whether a process of the group still exists.
        while Instant::now() < deadline && killpg(group, None).is_ok() {
            std::thread::sleep(Duration::from_millis(100));
            // The shell leader exits first and stays a zombie until ChildProcess reaps it, so
            // the group may look alive until then; Java exiting is what counts.
            if group_has_only_zombies(raw_pid) {
                break;
            }
        }
        let _ = killpg(group, Signal::SIGKILL);
    }
}

/// Tells whether every process in the group `group_id` is a zombie, read from `/proc`.
fn group_has_only_zombies(group_id: i32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    for entry in entries.flatten() {
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The fields after the parenthesised command name are: state ppid pgrp ...
        let Some((_, after_name)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        if fields.get(2) == Some(&group_id.to_string().as_str()) && fields.first() != Some(&"Z") {
            return false;
        }
    }
    true
}

/// Returns the Keycloak home that `tests/peers/keycloak.sh` installs, running the script at
/// most once per test process.
///
/// Returns [`LaunchError::Unavailable`] when the script fails, so that callers can skip.
pub fn keycloak_home() -> Result<PathBuf, LaunchError> {
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    INSTALLED
        .get_or_init(install_keycloak)
        .clone()
        .map_err(|reason| LaunchError::Unavailable {
            peer: "keycloak",
            reason,
        })
}

fn install_keycloak() -> Result<PathBuf, String> {
    let (home, stderr) = run_peer_script("keycloak.sh")?;
    if !home.join("bin").join("kc.sh").is_file() {
        return Err(format!(
            "keycloak.sh printed {:?}, which has no bin/kc.sh; stderr: {stderr}",
            home.display()
        ));
    }
    Ok(home)
}

/// Returns a Java home whose `java -version` reports [`MIN_JAVA_VERSION`] or newer, preferring
/// the newest among `KEYCLOAK_JAVA_HOME`, `JAVA_HOME` and the folders of `/usr/lib/jvm`.
pub fn java_home() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = [KEYCLOAK_JAVA_HOME_VARIABLE, "JAVA_HOME"]
        .iter()
        .filter_map(|name| std::env::var_os(name).map(PathBuf::from))
        .collect();
    if let Ok(entries) = fs::read_dir("/usr/lib/jvm") {
        candidates.extend(entries.flatten().map(|entry| entry.path()));
    }
    candidates
        .into_iter()
        .filter_map(|home| java_major_version(&home).map(|version| (version, home)))
        .filter(|(version, _)| *version >= MIN_JAVA_VERSION)
        .max_by_key(|(version, _)| *version)
        .map(|(_, home)| home)
}

fn java_major_version(home: &Path) -> Option<u32> {
    let output = Command::new(home.join("bin").join("java"))
        .arg("-version")
        .output()
        .ok()?;
    parse_java_major_version(&String::from_utf8_lossy(&output.stderr))
}

/// Reads the major version from `java -version` output such as `openjdk version "25.0.1"` or
/// `java version "1.8.0_392"` (which is Java 8).
fn parse_java_major_version(output: &str) -> Option<u32> {
    let quoted = output.split('"').nth(1)?;
    let mut parts = quoted.split(['.', '-', '+', '_']);
    let first: u32 = parts.next()?.parse().ok()?;
    if first == 1 {
        return parts.next()?.parse().ok();
    }
    Some(first)
}

/// Copies `realm_file` into `data/import` of the Keycloak home, where `start-dev
/// --import-realm` reads it, and returns the realm's name.
///
/// The file is named `REALM-realm.json` and replaced by a rename, so another Keycloak starting
/// from the same home never reads a half-written file.
fn import_realm(home: &Path, realm_file: &Path) -> Result<String, LaunchError> {
    let contents = fs::read(realm_file)
        .map_err(|source| LaunchError::io(format!("reading {}", realm_file.display()), source))?;
    let realm = realm_name(&contents).map_err(|reason| {
        LaunchError::io(
            format!("reading the realm name from {}", realm_file.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
        )
    })?;

    let import_dir = home.join("data").join("import");
    fs::create_dir_all(&import_dir)
        .map_err(|source| LaunchError::io(format!("creating {}", import_dir.display()), source))?;
    let target = import_dir.join(format!("{realm}-realm.json"));
    if fs::read(&target).is_ok_and(|existing| existing == contents) {
        return Ok(realm);
    }
    // The staged name has no .json suffix, so Keycloak never imports it.
    let mut staged = tempfile::Builder::new()
        .prefix(".staged-realm-")
        .tempfile_in(&import_dir)
        .map_err(|source| {
            LaunchError::io(
                format!("creating a file in {}", import_dir.display()),
                source,
            )
        })?;
    staged
        .write_all(&contents)
        .map_err(|source| LaunchError::io(format!("writing {}", target.display()), source))?;
    staged
        .persist(&target)
        .map_err(|error| LaunchError::io(format!("writing {}", target.display()), error.error))?;
    Ok(realm)
}

/// Returns the `realm` field of a realm export.
fn realm_name(contents: &[u8]) -> Result<String, String> {
    let document: Value =
        serde_json::from_slice(contents).map_err(|error| format!("invalid JSON: {error}"))?;
    match document["realm"].as_str() {
        Some(name) if !name.is_empty() => Ok(name.to_string()),
        _ => Err("the field \"realm\" is missing or not a non-empty string".to_string()),
    }
}

fn required_string(document: &Value, field: &str, action: &str) -> Result<String, KeycloakError> {
    document[field]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| KeycloakError::InvalidResponse {
            action: action.to_string(),
            reason: format!("the field {field:?} is missing or not a string"),
            body: document.to_string(),
        })
}

async fn check_discovery(address: SocketAddr, path: &str) -> Result<(), String> {
    let response = send(address, &HttpRequest::get(path))
        .await
        .map_err(|error| error.to_string())?;
    if response.status != StatusCode::OK {
        return Err(format!("GET {path} returned {}", response.status));
    }
    Ok(())
}

/// Writes a progress line to the process's stderr, which libtest does not capture.
fn report_progress(line: &str) {
    // A failed write to stderr leaves nothing better to report to.
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_version_of_modern_openjdk() {
        let output = "openjdk version \"25.0.1\" 2025-10-21 LTS\nOpenJDK Runtime Environment\n";

        assert_eq!(parse_java_major_version(output), Some(25));
    }

    #[test]
    fn java_version_of_legacy_scheme_is_minor() {
        let output = "java version \"1.8.0_392\"\nJava(TM) SE Runtime Environment\n";

        assert_eq!(parse_java_major_version(output), Some(8));
    }

    #[test]
    fn java_version_without_quotes_is_none() {
        assert_eq!(parse_java_major_version("bash: java: not found"), None);
    }

    #[test]
    fn realm_name_reads_realm_field() {
        let name = realm_name(br#"{"realm": "orders", "enabled": true}"#);

        assert_eq!(name, Ok("orders".to_string()));
    }

    #[test]
    fn realm_name_rejects_missing_field() {
        let error = realm_name(br#"{"enabled": true}"#);

        assert_eq!(
            error,
            Err("the field \"realm\" is missing or not a non-empty string".to_string())
        );
    }

    #[test]
    fn realm_name_rejects_invalid_json() {
        let error = realm_name(b"{").expect_err("truncated JSON must be rejected");

        assert!(error.starts_with("invalid JSON: "), "{error}");
    }
}
