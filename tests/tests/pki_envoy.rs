//! A real Envoy calls the portcullis binary over mTLS with its own client certificate, issued
//! by the Vault stand-in, while portcullis rotates its certificate every few seconds.
//!
//! The test skips with a `SKIPPED:` line when Envoy cannot be installed, unless
//! `PORTCULLIS_REQUIRE_PEERS=1`. It fails when the portcullis binary has not been built.

use std::time::{Duration, Instant};

use portcullis_e2e::vault::{VaultOptions, VaultStandIn};
use portcullis_e2e::{
    Envoy, EnvoyClientTls, EnvoyOptions, HttpRequest, Portcullis, PortcullisOptions, Upstream,
    envoy_binary_or_skip, send, write_bundle,
};

const POLICY: &str = r#"package envoy.authz

default allow := false

allow if input.parsed_path[0] == "ok"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_over_mtls_sees_no_failure_while_certificates_rotate() {
    let test = "envoy_over_mtls_sees_no_failure_while_certificates_rotate";
    let Some(envoy_binary) = envoy_binary_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("creating a temporary folder failed");
    let vault = VaultStandIn::start(VaultOptions::default())
        .await
        .expect("starting the Vault stand-in failed");
    let token_file = dir.path().join("service-account-token");
    std::fs::write(&token_file, VaultOptions::default().service_account_jwt)
        .expect("writing the token file failed");
    let bundle = dir.path().join("bundle");
    write_bundle(&bundle, "r1", POLICY).expect("writing the bundle failed");

    let mut options = PortcullisOptions::new(&bundle);
    options.log_level = "info,portcullis=debug,portcullis_pki=debug".to_owned();
    options.extra_config = format!(
        "vault:\n  address: {address:?}\n  auth:\n    method: kubernetes\n    role: portcullis\n    service_account_token_file: {token:?}\ntls:\n  common_name: portcullis.test\n  ttl: 6s\n  min_retry: 200ms\n  max_retry: 1s\n  expiry_margin: 1s\n",
        address = vault.address(),
        token = token_file.display().to_string(),
    );
    let portcullis_binary = Portcullis::binary().unwrap_or_else(|error| panic!("{test}: {error}"));
    let portcullis = Portcullis::start(&portcullis_binary, &options)
        .await
        .unwrap_or_else(|error| panic!("{test}: starting portcullis failed: {error}"));

    let envoy_identity = vault
        .issue_files(
            dir.path(),
            "envoy",
            &["envoy.test"],
            Duration::from_secs(3600),
        )
        .expect("issuing Envoy's certificate failed");
    let upstream = Upstream::start()
        .await
        .expect("starting the upstream failed");
    let mut envoy_options = EnvoyOptions::new(portcullis.grpc_address(), upstream.address());
    envoy_options.authz_tls = Some(EnvoyClientTls {
        certificate: envoy_identity.certificate.clone(),
        private_key: envoy_identity.private_key.clone(),
        ca_bundle: envoy_identity.ca_bundle.clone(),
        server_name: "portcullis.test".to_owned(),
    });
    let envoy = Envoy::start(&envoy_binary, &envoy_options)
        .await
        .unwrap_or_else(|error| panic!("{test}: starting Envoy failed: {error}"));
    let logs = || format!("{}{}", envoy.log_tail(), portcullis.log_tail());

    let issued_at_start = vault.counts().issued.len();
    let mut statuses = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(16) {
        let allowed = send(envoy.listener_address(), &HttpRequest::get("/ok/items"))
            .await
            .unwrap_or_else(|error| panic!("{error}\n{}", logs()));
        let denied = send(envoy.listener_address(), &HttpRequest::get("/other"))
            .await
            .unwrap_or_else(|error| panic!("{error}\n{}", logs()));
        statuses.push((allowed.status.as_u16(), denied.status.as_u16()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let rotations = vault.counts().issued.len() - issued_at_start;
    eprintln!(
        "Envoy figures: {} request pairs through Envoy over mTLS, {rotations} portcullis rotations",
        statuses.len()
    );
    let unexpected: Vec<_> = statuses
        .iter()
        .filter(|statuses| **statuses != (200, 403))
        .collect();
    assert_eq!(
        unexpected,
        Vec::<&(u16, u16)>::new(),
        "{} of {} request pairs had other statuses\n{}",
        unexpected.len(),
        statuses.len(),
        logs()
    );
    assert!(
        statuses.len() > 50,
        "only {} request pairs in 16 s",
        statuses.len()
    );
    assert!(
        rotations >= 2,
        "portcullis rotated {rotations} times in 16 s\n{}",
        logs()
    );
    assert_eq!(upstream.requests().len(), statuses.len());
}
