//! End-to-end verification of tokens issued by a real Keycloak 26 on 127.0.0.1, through OIDC
//! discovery, including a realm key rotation picked up without restarting the verifier.
//!
//! Keycloak is installed by `tests/peers/keycloak.sh` and needs Java 21 or newer (found through
//! `KEYCLOAK_JAVA_HOME`, `JAVA_HOME` or `/usr/lib/jvm`). When it cannot be installed or started
//! the test prints `SKIPPED: ...` and passes, unless `PORTCULLIS_REQUIRE_PEERS=1`.

use std::collections::HashMap;
use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_jwt::{
    InvalidReason, KeySource, ProviderConfig, RequestView, TokenOutcome, Verifier, VerifierConfig,
};
use serde_json::{Value, json};

const REALM: &str = "portcullis-test";
const CLIENT_ID: &str = "portcullis-service";
const CLIENT_SECRET: &str = "test-only-client-secret";
const ADMIN_USER: &str = "admin";
const ADMIN_PASSWORD: &str = "test-only-admin-password";
const READY_TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_tokens_verify_across_key_rotation() {
    let keycloak = match Keycloak::start().await {
        Ok(keycloak) => keycloak,
        Err(reason) => return skip(&reason),
    };
    let http = http_client();

    // Discovery and the first JWKS fetch; Keycloak publishes an RSA-OAEP key with use "enc".
    let verifier = verifier_for(&keycloak.issuer());
    let status = verifier.start().await;
    assert!(status[0].usable, "{status:?}");
    assert_eq!(status[0].key_count, 1, "{status:?}");
    assert!(
        status[0]
            .skipped_keys
            .iter()
            .any(|key| key.reason == "use is \"enc\", not \"sig\""),
        "the enc key should be skipped: {status:?}"
    );

    let service_token = keycloak.client_credentials_token(&http).await;
    let service = expect_valid(&verifier, &service_token).await;
    assert_eq!(service.issuer, keycloak.issuer());
    assert!(
        service.audiences.contains(&"portcullis".to_owned()),
        "{:?}",
        service.audiences
    );
    assert_eq!(service.claims.get("azp"), Some(&json!(CLIENT_ID)));
    assert_eq!(
        service.kid.as_deref(),
        Some(token_kid(&service_token).as_str())
    );

    let user_token = keycloak
        .password_token(&http, "alice", "test-only-password")
        .await;
    let user = expect_valid(&verifier, &user_token).await;
    assert_eq!(user.claims.get("preferred_username"), Some(&json!("alice")));
    assert!(user.subject.is_some());

    // Rotate: a new RSA key with a higher priority, and the old key disabled.
    keycloak.rotate_signing_key(&http).await;
    let fetches_before = verifier.status()[0].fetch_attempts;
    let rotated_token = keycloak.client_credentials_token(&http).await;
    assert_ne!(
        token_kid(&rotated_token),
        token_kid(&service_token),
        "Keycloak kept signing with the old key"
    );

    let rotated = expect_valid(&verifier, &rotated_token).await;
    assert_eq!(
        rotated.kid.as_deref(),
        Some(token_kid(&rotated_token).as_str())
    );
    assert_eq!(verifier.status()[0].fetch_attempts, fetches_before + 1);

    // The old key left the JWKS, so the cached verification of the old token is not reused.
    match bearer(&verifier, &service_token).await {
        TokenOutcome::Invalid(invalid) => {
            assert_eq!(invalid.reason, InvalidReason::UnknownKey, "{invalid:?}")
        }
        other => panic!("token of the disabled key should be rejected, got {other:?}"),
    }
    drop(keycloak);
}

fn verifier_for(issuer: &str) -> Verifier {
    let mut provider = ProviderConfig::new("keycloak", issuer, KeySource::OidcDiscovery);
    provider.audiences = vec!["portcullis".to_owned()];
    provider.jwks.allow_http_loopback = true;
    provider.jwks.unknown_kid_refetch_interval = Duration::from_secs(1);
    provider.jwks.fetch_timeout = Duration::from_secs(10);
    Verifier::new(VerifierConfig {
        providers: vec![provider],
        ..Default::default()
    })
    .expect("configuration is valid")
}

async fn bearer(verifier: &Verifier, token: &str) -> TokenOutcome {
    let headers = HashMap::from([("authorization".to_owned(), format!("Bearer {token}"))]);
    verifier
        .authenticate(&RequestView::new(&headers, "/"))
        .await
}

async fn expect_valid(verifier: &Verifier, token: &str) -> portcullis_jwt::Identity {
    match bearer(verifier, token).await {
        TokenOutcome::Valid(identity) => identity,
        other => panic!("Keycloak token should verify, got {other:?}"),
    }
}

/// Reads the `kid` from a token header, for comparison only.
fn token_kid(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().expect("token has a header");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .expect("header is base64url");
    let header: Value = serde_json::from_slice(&bytes).expect("header is JSON");
    header["kid"]
        .as_str()
        .expect("Keycloak tokens carry a kid")
        .to_owned()
}

fn skip(reason: &str) {
    if std::env::var("PORTCULLIS_REQUIRE_PEERS").as_deref() == Ok("1") {
        panic!("Keycloak is required (PORTCULLIS_REQUIRE_PEERS=1) but unavailable: {reason}");
    }
    // Written to the process's stderr directly, so that the test harness does not capture it.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: keycloak_tokens_verify_across_key_rotation: {reason}"
    );
}

fn http_client() -> reqwest::Client {
    // The crate's reqwest has no built-in TLS provider; this client only talks plain HTTP to
    // 127.0.0.1, but reqwest still needs a provider to build.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client builds")
}

/// A Keycloak process on 127.0.0.1, stopped (with its whole process group) on drop.
struct Keycloak {
    child: Child,
    port: u16,
    log_path: PathBuf,
    _work: tempfile::TempDir,
}

impl Keycloak {
    async fn start() -> Result<Self, String> {
        let home = install()?;
        let java_home = find_java_home()
            .ok_or("no Java 21 or newer found in KEYCLOAK_JAVA_HOME, JAVA_HOME or /usr/lib/jvm")?;

        // start-dev imports every realm file in data/import; the in-memory database keeps
        // nothing between runs.
        let import_dir = home.join("data/import");
        fs::create_dir_all(&import_dir)
            .map_err(|error| format!("cannot create {}: {error}", import_dir.display()))?;
        let realm =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keycloak-realm.json");
        fs::copy(&realm, import_dir.join("portcullis-test-realm.json")).map_err(|error| {
            format!(
                "cannot copy {} into {}: {error}",
                realm.display(),
                import_dir.display()
            )
        })?;

        let work = tempfile::tempdir().map_err(|error| error.to_string())?;
        let log_path = work.path().join("keycloak.log");
        let log = fs::File::create(&log_path).map_err(|error| error.to_string())?;
        let port = free_port()?;
        let management_port = free_port()?;
        let child = Command::new(home.join("bin/kc.sh"))
            .args([
                "start-dev",
                &format!("--http-port={port}"),
                "--http-host=127.0.0.1",
                &format!("--http-management-port={management_port}"),
                "--db=dev-mem",
                "--import-realm",
            ])
            .env("JAVA_HOME", &java_home)
            .env("KC_BOOTSTRAP_ADMIN_USERNAME", ADMIN_USER)
            .env("KC_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|error| error.to_string())?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|error| format!("cannot run {}/bin/kc.sh: {error}", home.display()))?;

        let mut keycloak = Keycloak {
            child,
            port,
            log_path,
            _work: work,
        };
        keycloak.wait_until_ready().await?;
        Ok(keycloak)
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn issuer(&self) -> String {
        format!("{}/realms/{REALM}", self.base_url())
    }

    async fn wait_until_ready(&mut self) -> Result<(), String> {
        let http = http_client();
        let url = format!("{}/.well-known/openid-configuration", self.issuer());
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "Keycloak exited with {status} before it was ready\n{}",
                    self.log_tail()
                ));
            }
            if let Ok(response) = http.get(&url).timeout(Duration::from_secs(5)).send().await
                && response.status().is_success()
            {
                println!(
                    "Keycloak ready after {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(format!(
                    "Keycloak not ready after {READY_TIMEOUT:?}\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("last lines of {}:\n{tail}", self.log_path.display())
    }

    async fn token(&self, http: &reqwest::Client, realm: &str, form: &[(&str, &str)]) -> String {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let url = format!(
            "{}/realms/{realm}/protocol/openid-connect/token",
            self.base_url()
        );
        let response = http
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|error| panic!("POST {url} failed: {error}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "POST {url} returned {status}: {text}");
        let document: Value = serde_json::from_str(&text).expect("token response is JSON");
        document["access_token"]
            .as_str()
            .expect("token response has access_token")
            .to_owned()
    }

    async fn client_credentials_token(&self, http: &reqwest::Client) -> String {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ];
        self.token(http, REALM, &form).await
    }

    async fn password_token(
        &self,
        http: &reqwest::Client,
        username: &str,
        password: &str,
    ) -> String {
        let form = [
            ("grant_type", "password"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("username", username),
            ("password", password),
        ];
        self.token(http, REALM, &form).await
    }

    async fn admin(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        let form = [
            ("grant_type", "password"),
            ("client_id", "admin-cli"),
            ("username", ADMIN_USER),
            ("password", ADMIN_PASSWORD),
        ];
        let admin_token = self.token(http, "master", &form).await;
        let url = format!("{}/admin/realms/{REALM}{path}", self.base_url());
        let mut request = http.request(method.clone(), &url).bearer_auth(admin_token);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|error| panic!("{method} {url} failed: {error}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "{method} {url} returned {status}: {text}"
        );
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("admin response is JSON")
        }
    }

    /// Adds an RSA key provider with a higher priority, then disables the original one, so that
    /// new tokens carry a new `kid` and the old key leaves the JWKS.
    async fn rotate_signing_key(&self, http: &reqwest::Client) {
        let realm = self.admin(http, reqwest::Method::GET, "", None).await;
        let realm_id = realm["id"].as_str().expect("realm has an id").to_owned();
        let components = self
            .admin(
                http,
                reqwest::Method::GET,
                "/components?type=org.keycloak.keys.KeyProvider",
                None,
            )
            .await;
        let original = components
            .as_array()
            .expect("components are a list")
            .iter()
            .find(|component| component["providerId"] == "rsa-generated")
            .expect("the realm has a generated RSA key")
            .clone();

        let new_provider = json!({
            "name": "rotated-rsa",
            "providerId": "rsa-generated",
            "providerType": "org.keycloak.keys.KeyProvider",
            "parentId": realm_id,
            "config": {"priority": ["200"], "keySize": ["2048"], "algorithm": ["RS256"]},
        });
        self.admin(
            http,
            reqwest::Method::POST,
            "/components",
            Some(new_provider),
        )
        .await;

        let mut disabled = original.clone();
        disabled["config"]["enabled"] = json!(["false"]);
        let path = format!(
            "/components/{}",
            original["id"].as_str().expect("component has an id")
        );
        self.admin(http, reqwest::Method::PUT, &path, Some(disabled))
            .await;
    }
}

impl Drop for Keycloak {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// Runs `tests/peers/keycloak.sh` and returns the Keycloak home it prints.
fn install() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/peers/keycloak.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|error| format!("cannot run {}: {error}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed with {}",
            script.display(),
            output.status
        ));
    }
    let home = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let home = PathBuf::from(home);
    if !home.join("bin/kc.sh").is_file() {
        return Err(format!(
            "{} printed {}, which has no bin/kc.sh",
            script.display(),
            home.display()
        ));
    }
    Ok(home)
}

/// Returns a Java home whose `java -version` reports 21 or newer, preferring the newest.
fn find_java_home() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = ["KEYCLOAK_JAVA_HOME", "JAVA_HOME"]
        .iter()
        .filter_map(|name| std::env::var_os(name).map(PathBuf::from))
        .collect();
    if let Ok(entries) = fs::read_dir("/usr/lib/jvm") {
        candidates.extend(entries.filter_map(|entry| entry.ok().map(|entry| entry.path())));
    }
    candidates
        .into_iter()
        .filter_map(|home| java_major_version(&home).map(|version| (version, home)))
        .filter(|(version, _)| *version >= 21)
        .max_by_key(|(version, _)| *version)
        .map(|(_, home)| home)
}

fn java_major_version(home: &Path) -> Option<u32> {
    let output = Command::new(home.join("bin/java"))
        .arg("-version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stderr);
    let quoted = text.split('"').nth(1)?;
    quoted.split(['.', '-', '+']).next()?.parse().ok()
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|error| format!("cannot bind 127.0.0.1:0: {error}"))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|error| error.to_string())
}
