//! Tests of the Helm chart in `charts/portcullis` with a real Helm 4.
//!
//! helm comes from `PORTCULLIS_HELM`, else from `tests/peers/helm.sh`; the Kubernetes JSON
//! schemas come from the PyPI package kubernetes-validate through
//! `charts/portcullis/tests/kubernetes-validate.sh`. When either cannot be installed, the
//! tests that need it print `SKIPPED` and pass, unless `PORTCULLIS_REQUIRE_PEERS=1`.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use common::{NAMESPACE, RELEASE, find, of_kind, parse_documents, parse_yaml, render};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis_inject::{
    AUDIT_SIGNING_KEY_MOUNT_PATH, AUDIT_SPOOL_MOUNT_PATH, Injector, InjectorOptions,
    POD_ENVIRONMENT, POLICY_MOUNT_PATH, VAULT_TOKEN_PATH,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

const INJECTOR: &str = "t-portcullis-injector";
const SIDECAR_CONFIG: &str = "t-portcullis-sidecar";

/// Default values plus every file in `charts/portcullis/tests/values`, by display name.
fn value_sets() -> Vec<(String, Option<PathBuf>)> {
    let mut sets = vec![("default values".to_owned(), None)];
    for path in common::values_files() {
        let name = path
            .file_name()
            .expect("a file name")
            .to_string_lossy()
            .into_owned();
        sets.push((name, Some(path)));
    }
    sets
}

fn rendered(helm: &Path, values: Option<&Path>) -> Vec<Value> {
    parse_documents(&render(helm, values, &[]))
}

fn decode_data(object: &Value, key: &str) -> String {
    let encoded = object["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("data.{key} is missing"));
    String::from_utf8(BASE64.decode(encoded).expect("data is base64")).expect("data is UTF-8")
}

/// Returns the injector options rendered into the injector ConfigMap of release `t`.
fn injector_options(documents: &[Value]) -> InjectorOptions {
    options_from_config_map(find(documents, "ConfigMap", Some(NAMESPACE), INJECTOR))
}

fn options_from_config_map(config_map: &Value) -> InjectorOptions {
    let text = config_map["data"]["injector.yaml"]
        .as_str()
        .expect("injector.yaml is a string");
    InjectorOptions::from_yaml(text).unwrap_or_else(|problems| {
        panic!("the rendered injector.yaml is invalid: {problems:?}\n{text}")
    })
}

/// Returns the namespaces that got the sidecar config ConfigMap.
fn sidecar_namespaces(documents: &[Value]) -> BTreeSet<String> {
    of_kind(documents, "ConfigMap")
        .into_iter()
        .filter(|config_map| config_map["metadata"]["name"] == SIDECAR_CONFIG)
        .map(|config_map| {
            config_map["metadata"]["namespace"]
                .as_str()
                .expect("namespace")
                .to_owned()
        })
        .collect()
}

#[test]
fn chart_lints_and_renders_for_each_values_file() {
    let Some(helm) = common::helm_or_skip("chart_lints_and_renders_for_each_values_file") else {
        return;
    };

    for (name, values) in value_sets() {
        let chart = common::chart_dir();
        let mut arguments = vec![
            "lint".to_owned(),
            "--strict".to_owned(),
            chart.display().to_string(),
        ];
        if let Some(values) = &values {
            arguments.extend(["--values".to_owned(), values.display().to_string()]);
        }
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        let lint = common::run_helm(&helm, &arguments);
        assert!(
            lint.success,
            "helm lint with {name} failed:\n{}{}",
            lint.stdout, lint.stderr
        );
        assert!(
            lint.stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{name}: {}",
            lint.stdout
        );

        let documents = rendered(&helm, values.as_deref());
        let kinds: BTreeSet<&str> = documents
            .iter()
            .map(|document| document["kind"].as_str().expect("kind"))
            .collect();
        for kind in [
            "ConfigMap",
            "Deployment",
            "MutatingWebhookConfiguration",
            "Service",
            "ServiceAccount",
        ] {
            assert!(
                kinds.contains(kind),
                "{name}: no {kind} rendered; kinds: {kinds:?}"
            );
        }
        for document in &documents {
            assert_eq!(
                document["metadata"]["labels"]["app.kubernetes.io/instance"], RELEASE,
                "{name}: {document}"
            );
        }
        // The injector needs no Kubernetes API access, so the chart grants none.
        for kind in ["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"] {
            assert!(!kinds.contains(kind), "{name}: unexpected {kind}");
        }
    }
}

#[test]
fn rendered_objects_match_kubernetes_schemas() {
    let test = "rendered_objects_match_kubernetes_schemas";
    let Some(helm) = common::helm_or_skip(test) else {
        return;
    };
    let Some(python) = common::schema_validator_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("creating a temporary folder failed");

    let mut files = Vec::new();
    let mut object_count = 0;
    for (index, (_, values)) in value_sets().iter().enumerate() {
        let path = dir.path().join(format!("rendered-{index}.yaml"));
        let text = render(&helm, values.as_deref(), &[]);
        object_count += parse_documents(&text).len();
        std::fs::write(&path, text).expect("writing the rendering failed");
        files.push(path);
    }

    // 1.25 is the oldest version the chart's kubeVersion accepts.
    for version in ["1.25", "1.29", "1.34"] {
        let report = run_validator(&python, version, &files);
        assert!(
            report.success,
            "schema validation for Kubernetes {version} failed:\n{}",
            report.output
        );
        assert!(!report.output.contains("invalid"), "{}", report.output);
        let checked = report
            .output
            .lines()
            .filter(|line| line.starts_with("ok "))
            .count();
        assert_eq!(checked, object_count, "{}", report.output);
    }
}

#[test]
fn injected_pods_match_kubernetes_pod_schema() {
    let test = "injected_pods_match_kubernetes_pod_schema";
    let Some(python) = common::schema_validator_or_skip(test) else {
        return;
    };
    let expected_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/expected");
    let mut native = Vec::new();
    let mut legacy = Vec::new();
    for entry in std::fs::read_dir(&expected_dir).expect("listing the expected pods failed") {
        let path = entry.expect("reading a folder entry failed").path();
        if path.to_string_lossy().ends_with("-legacy.json") {
            legacy.push(path);
        } else {
            native.push(path);
        }
    }
    assert!(
        !native.is_empty(),
        "no native expected pods in {}",
        expected_dir.display()
    );
    assert!(
        !legacy.is_empty(),
        "no legacy expected pods in {}",
        expected_dir.display()
    );

    // Container restartPolicy, which native sidecars use, is in the Pod schema from 1.28 on.
    for (version, files) in [("1.29", &native), ("1.28", &legacy), ("1.34", &native)] {
        let report = run_validator(&python, version, files);
        assert!(report.success, "Kubernetes {version}:\n{}", report.output);
        assert_eq!(
            report
                .output
                .lines()
                .filter(|line| line.starts_with("ok Pod/"))
                .count(),
            files.len()
        );
    }
}

struct ValidatorReport {
    success: bool,
    output: String,
}

fn run_validator(python: &Path, version: &str, files: &[PathBuf]) -> ValidatorReport {
    let output = Command::new(python)
        .arg(common::chart_dir().join("tests/validate.py"))
        .args(["--kubernetes-version", version])
        .args(files)
        .output()
        .expect("running validate.py failed");
    ValidatorReport {
        success: output.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

#[test]
fn invalid_values_fail_with_schema_message() {
    let Some(helm) = common::helm_or_skip("invalid_values_fail_with_schema_message") else {
        return;
    };
    let files = common::invalid_values_files();
    assert!(
        files.len() >= 10,
        "expected the invalid values files, found {files:?}"
    );

    for path in files {
        let text = std::fs::read_to_string(&path).expect("reading the values file failed");
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            path.display()
        );

        let chart = common::chart_dir();
        let output = common::run_helm(
            &helm,
            &[
                "template",
                RELEASE,
                chart.to_str().expect("UTF-8"),
                "--values",
                path.to_str().expect("UTF-8"),
            ],
        );
        assert!(
            !output.success,
            "{} rendered without an error",
            path.display()
        );
        for message in expected {
            assert!(
                output.stderr.contains(message),
                "{}: expected {message:?} in helm's error:\n{}",
                path.display(),
                output.stderr
            );
        }
    }
}

#[test]
fn rendered_injector_config_agrees_with_sidecar_config() {
    let Some(helm) = common::helm_or_skip("rendered_injector_config_agrees_with_sidecar_config")
    else {
        return;
    };

    for (name, values) in value_sets() {
        let documents = rendered(&helm, values.as_deref());
        let options = injector_options(&documents);
        let sidecar = &options.injection.sidecar;
        let namespaces = sidecar_namespaces(&documents);
        assert!(!namespaces.is_empty(), "{name}: no sidecar ConfigMap");
        assert_eq!(sidecar.config_map, SIDECAR_CONFIG, "{name}");

        for namespace in &namespaces {
            let config_map = find(&documents, "ConfigMap", Some(namespace), SIDECAR_CONFIG);
            let config = parse_yaml(
                config_map["data"]["config.yaml"]
                    .as_str()
                    .expect("config.yaml"),
            );
            assert_eq!(
                config["listen"]["address"],
                format!("127.0.0.1:{}", sidecar.grpc_port),
                "{name}: the sidecar must listen where the ServiceEntry points"
            );
            assert_eq!(
                config["admin"]["address"],
                format!("0.0.0.0:{}", sidecar.admin_port),
                "{name}"
            );

            let policy = sidecar
                .policy_config_map
                .as_deref()
                .unwrap_or_else(|| panic!("{name}: no policy ConfigMap"));
            assert_eq!(config["policy"]["bundle"], POLICY_MOUNT_PATH, "{name}");
            let rendered_policy = of_kind(&documents, "ConfigMap")
                .into_iter()
                .any(|config_map| {
                    config_map["metadata"]["name"] == policy
                        && config_map["metadata"]["namespace"] == namespace.as_str()
                });
            let existing = policy == "reports-policy";
            assert_eq!(
                rendered_policy, !existing,
                "{name}: policy ConfigMap {policy} in {namespace}"
            );
            match &sidecar.vault_token {
                Some(_) => {
                    assert_eq!(
                        config["vault"]["auth"]["service_account_token_file"], VAULT_TOKEN_PATH,
                        "{name}"
                    );
                    assert_eq!(config["vault"]["auth"]["method"], "kubernetes", "{name}");
                    assert_eq!(config["tls"]["source"], "vault", "{name}");
                }
                None => {
                    assert_eq!(config.get("vault"), None, "{name}");
                    assert_eq!(config.get("tls"), None, "{name}");
                }
            }
            match &sidecar.audit_signing_key_secret {
                Some(_) => assert!(
                    config["audit"]["checkpoint"]["signing_key_file"]
                        .as_str()
                        .is_some_and(|path| path.starts_with(AUDIT_SIGNING_KEY_MOUNT_PATH)),
                    "{name}: {config}"
                ),
                None => assert_eq!(config["audit"].get("checkpoint"), None, "{name}"),
            }
            let mode = config["audit"]["mode"].as_str().expect("audit.mode");
            match &sidecar.audit_spool {
                Some(_) if mode == "file" => assert!(
                    config["audit"]["path"]
                        .as_str()
                        .is_some_and(|path| path.starts_with(AUDIT_SPOOL_MOUNT_PATH)),
                    "{name}: {config}"
                ),
                Some(_) if mode == "kafka" => assert!(
                    config["audit"]["state_file"]
                        .as_str()
                        .is_some_and(|path| path.starts_with(AUDIT_SPOOL_MOUNT_PATH)),
                    "{name}: {config}"
                ),
                Some(_) => assert_eq!(
                    config["audit"]["spool"]["dir"], AUDIT_SPOOL_MOUNT_PATH,
                    "{name}"
                ),
                None => assert_eq!(config["audit"].get("spool"), None, "{name}"),
            }
        }
    }
}

#[test]
fn default_values_render_the_expected_webhook() {
    let Some(helm) = common::helm_or_skip("default_values_render_the_expected_webhook") else {
        return;
    };
    let documents = rendered(&helm, None);

    let webhook_configuration = find(&documents, "MutatingWebhookConfiguration", None, INJECTOR);
    let webhooks = webhook_configuration["webhooks"]
        .as_array()
        .expect("webhooks");
    assert_eq!(webhooks.len(), 1);
    let webhook = &webhooks[0];
    assert_eq!(webhook["name"], "sidecar-injector.portcullis.io");
    assert_eq!(webhook["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(webhook["sideEffects"], "None");
    assert_eq!(webhook["failurePolicy"], "Ignore");
    assert_eq!(webhook["timeoutSeconds"], 10);
    assert_eq!(
        webhook["clientConfig"]["service"],
        json!({ "name": INJECTOR, "namespace": NAMESPACE, "path": "/mutate", "port": 443 })
    );
    assert_eq!(
        webhook["rules"],
        json!([{ "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced" }])
    );
    assert_eq!(
        webhook["namespaceSelector"],
        json!({ "matchLabels": { "portcullis-injection": "enabled" } })
    );
    assert_eq!(
        webhook["objectSelector"],
        json!({ "matchExpressions": [{ "key": "portcullis.io/inject", "operator": "NotIn", "values": ["false"] }] })
    );

    // The caBundle is the CA of the generated Secret, which signed the serving certificate.
    let secret = find(
        &documents,
        "Secret",
        Some(NAMESPACE),
        "t-portcullis-injector-tls",
    );
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let ca_bundle = webhook["clientConfig"]["caBundle"]
        .as_str()
        .expect("caBundle");
    assert_eq!(
        ca_bundle,
        secret["data"]["ca.crt"].as_str().expect("ca.crt")
    );

    let deployment = find(&documents, "Deployment", Some(NAMESPACE), INJECTOR);
    let pod = &deployment["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["portcullis.io/inject"], "false");
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    let container = &pod["spec"]["containers"][0];
    assert_eq!(
        container["args"],
        json!([
            "inject",
            "--config",
            "/etc/portcullis-inject/config/injector.yaml"
        ])
    );

    // Default options: the version Helm reports, failing open, the default deny policy.
    let options = injector_options(&documents);
    assert_eq!(
        options.injection.failure_policy,
        portcullis_inject::FailurePolicy::Ignore
    );
    assert!(options.injection.kubernetes_version.is_some());
    let policy = find(
        &documents,
        "ConfigMap",
        Some(NAMESPACE),
        "t-portcullis-policy",
    );
    let default_policy = std::fs::read_to_string(
        common::repository_root().join("policies/default/envoy/authz/policy.rego"),
    )
    .expect("reading the default policy failed");
    assert_eq!(policy["data"]["policy.rego"], default_policy);
    assert_eq!(of_kind(&documents, "ServiceEntry").len(), 0);
    assert_eq!(of_kind(&documents, "Certificate").len(), 0);
}

#[test]
fn cert_manager_and_istio_values_render_their_objects() {
    let Some(helm) = common::helm_or_skip("cert_manager_and_istio_values_render_their_objects")
    else {
        return;
    };
    let values = common::chart_dir().join("tests/values/production.yaml");
    let documents = rendered(&helm, Some(&values));

    let webhook_configuration = find(&documents, "MutatingWebhookConfiguration", None, INJECTOR);
    assert_eq!(
        webhook_configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        format!("{NAMESPACE}/{INJECTOR}")
    );
    let webhook = &webhook_configuration["webhooks"][0];
    assert_eq!(webhook["clientConfig"].get("caBundle"), None);
    assert_eq!(webhook["failurePolicy"], "Fail");
    assert_eq!(webhook["reinvocationPolicy"], "IfNeeded");
    assert_eq!(of_kind(&documents, "Secret").len(), 0);
    let certificate = find(&documents, "Certificate", Some(NAMESPACE), INJECTOR);
    assert_eq!(
        certificate["spec"]["secretName"],
        "t-portcullis-injector-tls"
    );
    assert_eq!(
        certificate["spec"]["issuerRef"],
        json!({ "name": "platform-ca", "kind": "ClusterIssuer", "group": "cert-manager.io" })
    );
    assert_eq!(of_kind(&documents, "Issuer").len(), 0);

    let service_entry = find(
        &documents,
        "ServiceEntry",
        Some(NAMESPACE),
        "t-portcullis-local",
    );
    assert_eq!(service_entry["spec"]["hosts"], json!(["portcullis.local"]));
    assert_eq!(
        service_entry["spec"]["endpoints"],
        json!([{ "address": "127.0.0.1" }])
    );
    assert_eq!(
        service_entry["spec"]["ports"],
        json!([{ "name": "grpc-ext-authz", "number": 9191, "protocol": "GRPC" }])
    );
    let policies = of_kind(&documents, "AuthorizationPolicy");
    let namespaces: BTreeSet<&str> = policies
        .iter()
        .map(|policy| policy["metadata"]["namespace"].as_str().expect("namespace"))
        .collect();
    assert_eq!(namespaces, BTreeSet::from(["payments", "shipping", "shop"]));
    for policy in policies {
        assert_eq!(policy["spec"]["action"], "CUSTOM");
        assert_eq!(policy["spec"]["provider"], json!({ "name": "portcullis" }));
        assert_eq!(
            policy["spec"]["rules"],
            json!([{ "to": [{ "operation": { "notPaths": ["/healthz", "/readyz", "/livez", "/metrics"] } }] }])
        );
    }

    // Kubernetes 1.28 in these values: a regular container, failing closed.
    let options = injector_options(&documents);
    assert!(!options.injection.native_sidecar());
    assert_eq!(
        options.injection.failure_policy,
        portcullis_inject::FailurePolicy::Fail
    );
}

#[test]
fn helm_generated_certificate_serves_the_webhook() {
    let Some(helm) = common::helm_or_skip("helm_generated_certificate_serves_the_webhook") else {
        return;
    };
    let documents = rendered(&helm, None);
    let secret = find(
        &documents,
        "Secret",
        Some(NAMESPACE),
        "t-portcullis-injector-tls",
    );
    let dir = tempfile::tempdir().expect("creating a temporary folder failed");
    let cert_file = dir.path().join("tls.crt");
    let key_file = dir.path().join("tls.key");
    std::fs::write(&cert_file, decode_data(secret, "tls.crt")).expect("writing tls.crt failed");
    std::fs::write(&key_file, decode_data(secret, "tls.key")).expect("writing tls.key failed");
    let ca = CertificateDer::from_pem_slice(decode_data(secret, "ca.crt").as_bytes())
        .expect("ca.crt is PEM");

    let mut options = injector_options(&documents);
    options.listen.address = "127.0.0.1:0".parse().expect("address");
    options.tls.cert_file = cert_file;
    options.tls.key_file = key_file;

    let runtime = tokio::runtime::Runtime::new().expect("starting a runtime failed");
    runtime.block_on(async {
        let injector = Injector::bind(options)
            .await
            .expect("the injector rejected the Helm certificate");
        let address = injector.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(injector.run(async {
            let _ = stopped.await;
        }));

        // The API server dials the Service name from the webhook's clientConfig.
        let server_name = format!("{INJECTOR}.{NAMESPACE}.svc");
        let answer = post_review(address, ca, &server_name).await;
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");

        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the injector did not stop")
            .expect("the injector task panicked")
            .expect("the injector failed");
    });
}

async fn post_review(address: SocketAddr, ca: CertificateDer<'static>, server_name: &str) -> Value {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("adding the CA failed");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connecting failed");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            ServerName::try_from(server_name.to_owned()).expect("valid name"),
            tcp,
        )
        .await
        .expect("the TLS handshake with the Helm certificate failed");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP handshake failed");
    tokio::spawn(connection);

    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "b4c2d9a4-2b43-4b0e-9a53-0f4c1f0e8f31",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "operation": "CREATE",
            "namespace": NAMESPACE,
            "object": { "metadata": { "name": "app" }, "spec": { "containers": [{ "name": "app", "image": "app:1" }] } },
        },
    });
    let request = http::Request::post("/mutate")
        .header("host", server_name)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&review).expect("JSON"),
        )))
        .expect("valid request");
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("the request timed out")
        .expect("the request failed");
    assert_eq!(response.status(), http::StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("reading the body failed")
        .to_bytes();
    serde_json::from_slice(&body).expect("the answer is JSON")
}

#[test]
fn plain_manifests_are_up_to_date() {
    let Some(helm) = common::helm_or_skip("plain_manifests_are_up_to_date") else {
        return;
    };
    let root = common::repository_root();
    let dir = tempfile::tempdir().expect("creating a temporary folder failed");

    let output = Command::new("bash")
        .arg(root.join("deploy/kubernetes/render.sh"))
        .arg(dir.path())
        .env("HELM", &helm)
        .output()
        .expect("running render.sh failed");
    assert!(
        output.status.success(),
        "render.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let fresh = std::fs::read_to_string(dir.path().join("portcullis.yaml"))
        .expect("reading the rendering failed");
    let committed = std::fs::read_to_string(root.join("deploy/kubernetes/portcullis.yaml"))
        .expect("reading deploy/kubernetes/portcullis.yaml failed");
    assert!(
        fresh == committed,
        "deploy/kubernetes/portcullis.yaml is out of date; run deploy/kubernetes/render.sh and commit the result"
    );
    let documents = parse_documents(&committed);
    let config_map = find(
        &documents,
        "ConfigMap",
        Some("portcullis-system"),
        "portcullis-injector",
    );
    let options = options_from_config_map(config_map);
    assert!(
        options.injection.native_sidecar(),
        "the plain manifests target Kubernetes 1.30"
    );
}

#[test]
fn chart_default_policy_matches_repository_default() {
    let root = common::repository_root();
    let chart_copy =
        std::fs::read_to_string(root.join("charts/portcullis/files/default-policy.rego"))
            .expect("reading the chart's default policy failed");
    let repository_default =
        std::fs::read_to_string(root.join("policies/default/envoy/authz/policy.rego"))
            .expect("reading policies/default failed");

    assert!(
        chart_copy == repository_default,
        "charts/portcullis/files/default-policy.rego differs from policies/default/envoy/authz/policy.rego; copy it again"
    );
}

/// Returns the portcullis binary: `PORTCULLIS_BIN`, else `portcullis` in the Cargo profile
/// folder of this test executable (`cargo build -p portcullis` puts it there).
fn portcullis_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PORTCULLIS_BIN") {
        return PathBuf::from(path);
    }
    let executable = std::env::current_exe().expect("locating the test executable failed");
    let deps_dir = executable
        .parent()
        .expect("the test executable has a folder");
    let profile_dir = deps_dir.parent().unwrap_or(deps_dir);
    profile_dir.join(format!("portcullis{}", std::env::consts::EXE_SUFFIX))
}

#[test]
fn rendered_sidecar_config_passes_config_validate() {
    let test = "rendered_sidecar_config_passes_config_validate";
    let Some(helm) = common::helm_or_skip(test) else {
        return;
    };
    let binary = portcullis_binary();
    if !binary.is_file() {
        let reason = format!(
            "{} not found; build it first: cargo build -p portcullis",
            binary.display()
        );
        assert!(
            std::env::var(common::REQUIRE_PEERS_VARIABLE).as_deref() != Ok("1"),
            "{test}: {reason}"
        );
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("SKIPPED: {test}: {reason}\n").as_bytes(),
        );
        return;
    }

    // Every values file, and settings that no values file covers.
    let mut cases: Vec<(String, Option<PathBuf>, &[&str])> = value_sets()
        .into_iter()
        .map(|(name, values)| (name, values, &[][..]))
        .collect();
    cases.push((
        "audit.mode=stdout".to_owned(),
        None,
        &["--set", "audit.mode=stdout"],
    ));
    cases.push((
        "audit.mode=none, text logs".to_owned(),
        None,
        &[
            "--set",
            "audit.mode=none",
            "--set",
            "sidecar.logFormat=text",
        ],
    ));
    cases.push((
        "Vault without SPIFFE".to_owned(),
        None,
        &[
            "--set",
            "vault.enabled=true",
            "--set",
            "vault.address=https://vault.vault.svc:8200",
        ],
    ));

    for (name, values, settings) in &cases {
        let documents = parse_documents(&render(&helm, values.as_deref(), settings));
        let namespace = sidecar_namespaces(&documents)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{name}: no sidecar ConfigMap"));
        let options = injector_options(&documents);
        let policy_config_map = options
            .injection
            .sidecar
            .policy_config_map
            .as_deref()
            .unwrap_or_else(|| panic!("{name}: no policy ConfigMap"));

        let dir = tempfile::tempdir().expect("creating a temporary folder failed");
        let bundle_dir = dir.path().join("policy");
        std::fs::create_dir(&bundle_dir).expect("creating the bundle folder failed");
        write_policy_files(&documents, &namespace, policy_config_map, &bundle_dir);
        let sidecar = find(&documents, "ConfigMap", Some(&namespace), SIDECAR_CONFIG);
        let config = sidecar["data"]["config.yaml"]
            .as_str()
            .expect("config.yaml");
        // The mount paths exist only in a pod, so they move into the temporary folder.
        let config = config
            .replace(POLICY_MOUNT_PATH, &bundle_dir.display().to_string())
            .replace(
                AUDIT_SPOOL_MOUNT_PATH,
                &dir.path().join("spool").display().to_string(),
            );
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, &config).expect("writing config.yaml failed");

        // The variables the injector sets from the pod, with the values of a pod of the
        // service account `cart`.
        let mut command = Command::new(&binary);
        command.args(["config", "validate"]).arg(&config_path);
        for (variable, _) in POD_ENVIRONMENT {
            command.env_remove(variable);
        }
        command
            .env("POD_NAME", "cart-7d9f8b6c4-x2x7q")
            .env("POD_NAMESPACE", &namespace)
            .env("SERVICE_ACCOUNT", "cart");
        let output = command
            .output()
            .expect("running portcullis config validate failed");
        assert!(
            output.status.success(),
            "{name}: portcullis config validate rejected the rendered configuration:\n{}{}\n{config}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("is valid"),
            "{name}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
}

/// Writes the bundle files of the policy ConfigMap into `bundle_dir`: the rendered one, or
/// the repository's default policy in place of a ConfigMap that the chart does not render.
fn write_policy_files(documents: &[Value], namespace: &str, name: &str, bundle_dir: &Path) {
    let rendered = of_kind(documents, "ConfigMap")
        .into_iter()
        .find(|config_map| {
            config_map["metadata"]["name"] == name
                && config_map["metadata"]["namespace"] == namespace
        });
    let Some(policy) = rendered else {
        let default_policy =
            common::repository_root().join("policies/default/envoy/authz/policy.rego");
        std::fs::copy(default_policy, bundle_dir.join("policy.rego"))
            .expect("copying the default policy failed");
        return;
    };
    for (file, content) in policy["data"].as_object().expect("policy data") {
        std::fs::write(
            bundle_dir.join(file),
            content.as_str().expect("file content"),
        )
        .expect("writing a policy file failed");
    }
}
