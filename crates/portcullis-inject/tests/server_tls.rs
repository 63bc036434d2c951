//! The webhook server over real TLS on 127.0.0.1: a test CA signs the serving certificate,
//! and a client that trusts only that CA posts AdmissionReviews as the API server does.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_inject::{Injector, InjectorOptions};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

/// Upper bound for one request, so that a hung server fails the test instead of stalling it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The webhook Service name a real API server would dial, also in the certificate.
const SERVICE_DNS_NAME: &str = "portcullis-injector.portcullis-system.svc";

struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("generating the CA key failed");
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).expect("self-signing the CA failed"),
        }
    }

    /// Writes a serving certificate for the Service name and 127.0.0.1, and its key.
    fn write_server_files(&self, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let params =
            CertificateParams::new(vec![SERVICE_DNS_NAME.to_owned(), "127.0.0.1".to_owned()])
                .expect("server certificate parameters");
        let key = KeyPair::generate().expect("generating the server key failed");
        let certificate = params
            .signed_by(&key, &self.issuer)
            .expect("signing the server certificate failed");

        let cert_file = dir.join("tls.crt");
        let key_file = dir.join("tls.key");
        std::fs::write(&cert_file, certificate.pem()).expect("writing tls.crt failed");
        std::fs::write(&key_file, key.serialize_pem()).expect("writing tls.key failed");
        (cert_file, key_file)
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }
}

/// A running injector on 127.0.0.1, stopped when dropped.
struct RunningInjector {
    address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), portcullis_inject::InjectError>>,
    _dir: tempfile::TempDir,
}

impl RunningInjector {
    async fn start(ca: &TestCa, failure_policy: &str) -> Self {
        let dir = tempfile::tempdir().expect("creating a temporary folder failed");
        let (cert_file, key_file) = ca.write_server_files(dir.path());
        let yaml = format!(
            r#"
listen: {{ address: "127.0.0.1:0" }}
tls: {{ cert_file: "{}", key_file: "{}" }}
injection:
  kubernetes_version: "1.31"
  failure_policy: {failure_policy}
  sidecar: {{ image: "registry.example/portcullis:0.1.0", config_map: portcullis-sidecar }}
"#,
            cert_file.display(),
            key_file.display()
        );
        let options = InjectorOptions::from_yaml(&yaml).expect("test options are valid");
        let injector = Injector::bind(options)
            .await
            .expect("binding the injector failed");
        let address = injector.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(injector.run(async {
            let _ = stopped.await;
        }));
        RunningInjector {
            address,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(REQUEST_TIMEOUT, &mut self.task)
            .await
            .expect("the injector did not stop after the shutdown signal")
            .expect("the injector task panicked");
        result.expect("the injector returned an error");
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Protocol {
    Http1,
    Http2,
}

fn client_config(
    trusted: CertificateDer<'static>,
    protocol: Protocol,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted).expect("adding the test CA failed");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = match protocol {
        Protocol::Http1 => vec![b"http/1.1".to_vec()],
        Protocol::Http2 => vec![b"h2".to_vec()],
    };
    Arc::new(config)
}

/// Sends one request over a new TLS connection and returns the status and body.
async fn send(
    address: SocketAddr,
    trusted: CertificateDer<'static>,
    protocol: Protocol,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), String> {
    let exchange = async {
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|error| format!("connecting failed: {error}"))?;
        let server_name = ServerName::try_from("127.0.0.1").expect("valid server name");
        let tls = TlsConnector::from(client_config(trusted, protocol))
            .connect(server_name, tcp)
            .await
            .map_err(|error| format!("TLS handshake failed: {error}"))?;
        let io = TokioIo::new(tls);

        let response = match protocol {
            Protocol::Http1 => {
                let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|error| format!("HTTP/1.1 handshake failed: {error}"))?;
                tokio::spawn(connection);
                sender.send_request(request).await
            }
            Protocol::Http2 => {
                let (mut sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|error| format!("HTTP/2 handshake failed: {error}"))?;
                tokio::spawn(connection);
                sender.send_request(request).await
            }
        }
        .map_err(|error| format!("request failed: {error}"))?;

        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|error| format!("reading the body failed: {error}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| "request timed out".to_owned())?
}

fn post(path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", SERVICE_DNS_NAME)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .expect("valid request")
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", SERVICE_DNS_NAME)
        .body(Full::new(Bytes::new()))
        .expect("valid request")
}

fn pod_review(annotations: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0df28fbd-5f5f-11e8-9ea0-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": "CREATE",
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": { "name": "web", "namespace": "shop", "annotations": annotations },
                "spec": { "containers": [{ "name": "web", "image": "web:1" }] },
            },
        },
    })
}

fn decode_patch(response: &Value) -> Vec<Value> {
    let encoded = response["patch"].as_str().expect("patch is a string");
    serde_json::from_slice(&BASE64.decode(encoded).expect("patch is base64"))
        .expect("patch is JSON")
}

#[tokio::test]
async fn mutate_answers_review_over_tls() {
    let ca = TestCa::new("portcullis test CA");
    let injector = RunningInjector::start(&ca, "Ignore").await;

    for protocol in [Protocol::Http1, Protocol::Http2] {
        let body = serde_json::to_vec(&pod_review(json!({}))).expect("serializing failed");
        let (status, body) = send(
            injector.address,
            ca.der(),
            protocol,
            post("/mutate?timeout=10s", body),
        )
        .await
        .unwrap_or_else(|error| panic!("{protocol:?}: {error}"));

        assert_eq!(status, StatusCode::OK, "{protocol:?}");
        let answer: Value = serde_json::from_slice(&body).expect("the answer is JSON");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        let response = &answer["response"];
        assert_eq!(response["uid"], "0df28fbd-5f5f-11e8-9ea0-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let operations = decode_patch(response);
        assert_eq!(
            operations[0],
            json!({ "op": "add", "path": "/metadata/annotations/portcullis.io~1injected", "value": "true" })
        );
        let last = operations.last().expect("the patch has operations");
        assert_eq!(last["path"], "/spec/initContainers");
        assert_eq!(last["value"][0]["name"], "portcullis");
        assert_eq!(last["value"][0]["restartPolicy"], "Always");
    }

    injector.stop().await;
}

#[tokio::test]
async fn opted_out_pod_gets_no_patch_over_tls() {
    let ca = TestCa::new("portcullis test CA");
    let injector = RunningInjector::start(&ca, "Ignore").await;
    let review = pod_review(json!({ "portcullis.io/inject": "false" }));

    let (status, body) = send(
        injector.address,
        ca.der(),
        Protocol::Http1,
        post(
            "/mutate",
            serde_json::to_vec(&review).expect("serializing failed"),
        ),
    )
    .await
    .expect("request failed");

    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).expect("the answer is JSON");
    assert_eq!(
        answer["response"],
        json!({ "uid": "0df28fbd-5f5f-11e8-9ea0-42010a800002", "allowed": true })
    );
    injector.stop().await;
}

#[tokio::test]
async fn fail_policy_rejects_broken_pod_over_tls() {
    let ca = TestCa::new("portcullis test CA");
    let injector = RunningInjector::start(&ca, "Fail").await;
    let mut review = pod_review(json!({}));
    review["request"]["object"]["spec"]["volumes"] = json!("not a list");

    let (status, body) = send(
        injector.address,
        ca.der(),
        Protocol::Http1,
        post(
            "/mutate",
            serde_json::to_vec(&review).expect("serializing failed"),
        ),
    )
    .await
    .expect("request failed");

    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).expect("the answer is JSON");
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(
        answer["response"]["status"]["message"],
        "portcullis sidecar injection failed: request.object.spec.volumes is a string; expected an array"
    );
    injector.stop().await;
}

#[tokio::test]
async fn healthz_and_errors_over_tls() {
    let ca = TestCa::new("portcullis test CA");
    let injector = RunningInjector::start(&ca, "Ignore").await;
    let cases = [
        (get("/healthz"), StatusCode::OK, "ok\n"),
        (
            post("/mutate", "{not json"),
            StatusCode::BAD_REQUEST,
            "the request body is not a JSON AdmissionReview: key must be a string at line 1 column 2\n",
        ),
        (
            get("/mutate"),
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n",
        ),
        (
            get("/metrics"),
            StatusCode::NOT_FOUND,
            "not found; the webhook serves POST /mutate and GET /healthz\n",
        ),
    ];

    for (request, expected_status, expected_body) in cases {
        let path = request.uri().to_string();
        let (status, body) = send(injector.address, ca.der(), Protocol::Http1, request)
            .await
            .expect("request failed");
        assert_eq!(status, expected_status, "{path}");
        assert_eq!(String::from_utf8_lossy(&body), expected_body, "{path}");
    }
    injector.stop().await;
}

#[tokio::test]
async fn oversized_review_is_rejected_over_tls() {
    let ca = TestCa::new("portcullis test CA");
    let injector = RunningInjector::start(&ca, "Ignore").await;
    let body = vec![b' '; 8 * 1024 * 1024 + 1];

    let (status, body) = send(
        injector.address,
        ca.der(),
        Protocol::Http1,
        post("/mutate", body),
    )
    .await
    .expect("request failed");

    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        String::from_utf8_lossy(&body),
        "the request body is larger than 8388608 bytes\n"
    );
    injector.stop().await;
}

#[tokio::test]
async fn client_trusting_another_ca_fails_handshake() {
    let ca = TestCa::new("portcullis test CA");
    let other_ca = TestCa::new("some other CA");
    let injector = RunningInjector::start(&ca, "Ignore").await;

    let error = send(
        injector.address,
        other_ca.der(),
        Protocol::Http1,
        get("/healthz"),
    )
    .await
    .expect_err("a client trusting another CA completed the handshake");

    assert!(
        error.starts_with("TLS handshake failed: invalid peer certificate: UnknownIssuer"),
        "{error}"
    );
    injector.stop().await;
}
