use super::*;

const FULL: &str = r#"
listen:
  address: 127.0.0.1:9443
tls:
  cert_file: /tls/tls.crt
  key_file: /tls/tls.key
  reload_interval: 30s
injection:
  kubernetes_version: v1.30.2
  failure_policy: Fail
  sidecar:
    image: registry.example/portcullis:0.1.0
    image_pull_policy: IfNotPresent
    grpc_port: 9191
    admin_port: 9192
    run_as_user: 1000
    run_as_group: 1000
    resources:
      requests: { cpu: 10m }
    config_map: portcullis-sidecar
    policy_config_map: portcullis-policy
    vault_token: { audience: vault, expiration_seconds: 1800 }
    audit_spool: { size_limit: 512Mi }
    audit_signing_key_secret: portcullis-audit-key
"#;

const MINIMAL: &str = r#"
tls: { cert_file: /tls/tls.crt, key_file: /tls/tls.key }
injection:
  sidecar: { image: portcullis:dev, config_map: portcullis-sidecar }
"#;

fn problems(yaml: &str) -> Vec<String> {
    InjectorOptions::from_yaml(yaml)
        .expect_err("invalid options were accepted")
        .iter()
        .map(ConfigProblem::to_string)
        .collect()
}

#[test]
fn full_options_parse_every_field() {
    let options = InjectorOptions::from_yaml(FULL).expect("valid options were rejected");

    assert_eq!(
        options.listen.address,
        "127.0.0.1:9443".parse().expect("address")
    );
    assert_eq!(options.tls.cert_file, PathBuf::from("/tls/tls.crt"));
    assert_eq!(options.tls.key_file, PathBuf::from("/tls/tls.key"));
    assert_eq!(options.tls.reload_interval, Duration::from_secs(30));
    let injection = &options.injection;
    assert_eq!(
        injection.kubernetes_version,
        Some(KubernetesVersion {
            major: 1,
            minor: 30
        })
    );
    assert_eq!(injection.failure_policy, FailurePolicy::Fail);
    let sidecar = &injection.sidecar;
    assert_eq!(sidecar.image, "registry.example/portcullis:0.1.0");
    assert_eq!(sidecar.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!((sidecar.grpc_port, sidecar.admin_port), (9191, 9192));
    assert_eq!((sidecar.run_as_user, sidecar.run_as_group), (1000, 1000));
    assert_eq!(
        Value::Object(sidecar.resources.clone()),
        serde_json::json!({ "requests": { "cpu": "10m" } })
    );
    assert_eq!(sidecar.config_map, "portcullis-sidecar");
    assert_eq!(
        sidecar.policy_config_map.as_deref(),
        Some("portcullis-policy")
    );
    assert_eq!(
        sidecar.vault_token,
        Some(VaultToken {
            audience: "vault".to_owned(),
            expiration_seconds: 1800
        })
    );
    assert_eq!(
        sidecar.audit_spool,
        Some(AuditSpool {
            size_limit: Some("512Mi".to_owned()),
            medium: None
        })
    );
    assert_eq!(
        sidecar.audit_signing_key_secret.as_deref(),
        Some("portcullis-audit-key")
    );
}

#[test]
fn minimal_options_take_defaults() {
    let options = InjectorOptions::from_yaml(MINIMAL).expect("valid options were rejected");

    assert_eq!(
        options.listen.address,
        "0.0.0.0:8443".parse().expect("address")
    );
    assert_eq!(options.tls.reload_interval, Duration::from_secs(60));
    let injection = &options.injection;
    assert_eq!(injection.kubernetes_version, None);
    assert!(!injection.native_sidecar());
    assert_eq!(injection.failure_policy, FailurePolicy::Ignore);
    let sidecar = &injection.sidecar;
    assert_eq!(sidecar.image_pull_policy, None);
    assert_eq!((sidecar.grpc_port, sidecar.admin_port), (9191, 9192));
    assert_eq!((sidecar.run_as_user, sidecar.run_as_group), (65532, 65532));
    assert_eq!(
        Value::Object(sidecar.resources.clone()),
        serde_json::json!({
            "requests": { "cpu": "50m", "memory": "64Mi" },
            "limits": { "memory": "256Mi" },
        })
    );
    assert_eq!(sidecar.policy_config_map, None);
    assert_eq!(sidecar.vault_token, None);
    assert_eq!(sidecar.audit_spool, None);
    assert_eq!(sidecar.audit_signing_key_secret, None);
}

#[test]
fn vault_token_defaults_apply() {
    let yaml = MINIMAL.replace(
        "config_map: portcullis-sidecar }",
        "config_map: c, vault_token: {} }",
    );

    let options = InjectorOptions::from_yaml(&yaml).expect("valid options were rejected");

    assert_eq!(
        options.injection.sidecar.vault_token,
        Some(VaultToken {
            audience: "vault".to_owned(),
            expiration_seconds: 3600
        })
    );
}

#[test]
fn unknown_key_is_named_by_path() {
    let yaml = MINIMAL.replace("image: portcullis:dev", "image: portcullis:dev, imagee: x");

    let found = problems(&yaml);

    assert_eq!(found.len(), 1);
    assert!(
        found[0].starts_with("injection.sidecar.imagee: unknown field `imagee`"),
        "{found:?}"
    );
}

#[test]
fn missing_required_key_is_reported() {
    let found = problems("tls: { cert_file: a, key_file: b }\n");

    assert_eq!(found, vec!["(document): missing field `injection`"]);
}

#[test]
fn invalid_duration_names_value_and_path() {
    let yaml = MINIMAL.replace(
        "key_file: /tls/tls.key }",
        "key_file: /tls/tls.key, reload_interval: soon }",
    );

    let found = problems(&yaml);

    assert_eq!(found.len(), 1);
    assert!(
        found[0].starts_with("tls.reload_interval: invalid duration \"soon\""),
        "{found:?}"
    );
}

#[test]
fn invalid_kubernetes_version_names_value_and_path() {
    let yaml = format!("{MINIMAL}  kubernetes_version: latest\n");

    let found = problems(&yaml);

    assert_eq!(
        found,
        vec![
            "injection.kubernetes_version: invalid Kubernetes version \"latest\"; expected MAJOR.MINOR such as 1.30 or v1.30.2"
        ]
    );
}

#[test]
fn empty_kubernetes_version_means_unknown() {
    let yaml = format!("{MINIMAL}  kubernetes_version: \"\"\n");

    let options = InjectorOptions::from_yaml(&yaml).expect("valid options were rejected");

    assert_eq!(options.injection.kubernetes_version, None);
}

#[test]
fn invalid_failure_policy_is_rejected() {
    let yaml = format!("{MINIMAL}  failure_policy: Maybe\n");

    let found = problems(&yaml);

    assert_eq!(found.len(), 1);
    assert!(
        found[0].starts_with(
            "injection.failure_policy: unknown variant `Maybe`, expected `Ignore` or `Fail`"
        ),
        "{found:?}"
    );
}

#[test]
fn every_invalid_sidecar_value_is_reported() {
    let yaml = r#"
tls: { cert_file: a, key_file: b }
injection:
  sidecar:
    image: " "
    image_pull_policy: Sometimes
    grpc_port: 9191
    admin_port: 9191
    run_as_user: 0
    run_as_group: -1
    config_map: Portcullis_Config
    policy_config_map: "-policy"
    vault_token: { audience: "", expiration_seconds: 60 }
    audit_spool: { medium: Disk }
    audit_signing_key_secret: Audit_Key
"#;

    let found = problems(yaml);

    assert_eq!(
        found,
        vec![
            "injection.sidecar.image: must not be empty".to_owned(),
            "injection.sidecar.image_pull_policy: invalid value \"Sometimes\"; expected one of: Always, IfNotPresent, Never".to_owned(),
            "injection.sidecar.admin_port: must differ from grpc_port 9191".to_owned(),
            "injection.sidecar.run_as_user: invalid user id 0; the sidecar runs as a non-root user".to_owned(),
            "injection.sidecar.run_as_group: invalid group id -1".to_owned(),
            "injection.sidecar.config_map: invalid ConfigMap name \"Portcullis_Config\"; expected lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters".to_owned(),
            "injection.sidecar.policy_config_map: invalid ConfigMap name \"-policy\"; expected lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters".to_owned(),
            "injection.sidecar.vault_token.audience: must not be empty".to_owned(),
            "injection.sidecar.vault_token.expiration_seconds: invalid value 60; Kubernetes accepts 600 to 4294967296".to_owned(),
            "injection.sidecar.audit_spool.medium: invalid value \"Disk\"; expected Memory or no value".to_owned(),
            "injection.sidecar.audit_signing_key_secret: invalid Secret name \"Audit_Key\"; expected lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters".to_owned(),
        ]
    );
}

#[test]
fn zero_port_is_rejected() {
    let yaml = MINIMAL.replace(
        "image: portcullis:dev",
        "image: portcullis:dev, grpc_port: 0",
    );

    assert_eq!(
        problems(&yaml),
        vec!["injection.sidecar.grpc_port: must be between 1 and 65535"]
    );
}

#[test]
fn yaml_syntax_error_names_line() {
    let found = problems("tls: [unclosed\n");

    assert_eq!(found.len(), 1);
    assert!(
        found[0].starts_with("(document): invalid YAML at line"),
        "{found:?}"
    );
}

#[test]
fn several_documents_are_rejected() {
    let found = problems(&format!("{MINIMAL}---\n{MINIMAL}"));

    assert_eq!(
        found,
        vec!["(document): more than one YAML document; the file must contain exactly one"]
    );
}

#[test]
fn json_options_are_accepted() {
    let json = r#"{"tls": {"cert_file": "a", "key_file": "b"},
                   "injection": {"sidecar": {"image": "i", "config_map": "c"}}}"#;

    let options = InjectorOptions::from_yaml(json).expect("valid JSON options were rejected");

    assert_eq!(options.injection.sidecar.image, "i");
}

#[test]
fn from_file_names_the_file_in_errors() {
    let dir = tempfile::tempdir().expect("creating a temporary folder failed");
    let path = dir.path().join("injector.yaml");
    std::fs::write(&path, "tls: { cert_file: a, key_file: b }\n").expect("writing failed");

    let error = InjectorOptions::from_file(&path).expect_err("invalid file was accepted");

    assert_eq!(
        error.to_string(),
        format!(
            "injector configuration {} is invalid: (document): missing field `injection`",
            path.display()
        )
    );
    let missing = dir.path().join("missing.yaml");
    let error = InjectorOptions::from_file(&missing).expect_err("missing file was accepted");
    assert!(
        error.to_string().starts_with(&format!(
            "reading injector configuration {} failed:",
            missing.display()
        )),
        "{error}"
    );
}
