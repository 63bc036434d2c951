//! The portcullis container and the volumes it mounts, as Kubernetes JSON.
//!
//! The paths here are a contract with the sidecar configuration that the Helm chart renders
//! into the config ConfigMap: the policy bundle, the Vault token, the audit spool and the
//! checkpoint signing key are referenced there by these paths. The environment variables
//! carry what differs between pods that share that configuration.

use serde_json::{Value, json};

use crate::config::SidecarTemplate;
use crate::pod::SIDECAR_CONTAINER_NAME;

/// Folder of the config ConfigMap, which contains [`CONFIG_FILE_PATH`].
pub const CONFIG_MOUNT_PATH: &str = "/etc/portcullis";
/// The file passed to `portcullis serve --config`.
pub const CONFIG_FILE_PATH: &str = "/etc/portcullis/config.yaml";
/// Folder of the policy bundle ConfigMap. It is not below [`CONFIG_MOUNT_PATH`], because a
/// mount inside a ConfigMap mount relies on the runtime creating a folder in a read-only
/// volume.
pub const POLICY_MOUNT_PATH: &str = "/etc/portcullis-policy";
/// Folder of the projected Vault token.
pub const VAULT_TOKEN_MOUNT_PATH: &str = "/var/run/secrets/portcullis/vault";
/// The projected Vault token file.
pub const VAULT_TOKEN_PATH: &str = "/var/run/secrets/portcullis/vault/token";
/// Folder of the audit spool emptyDir.
pub const AUDIT_SPOOL_MOUNT_PATH: &str = "/var/lib/portcullis/spool";
/// Folder of the Secret with the audit checkpoint signing key.
pub const AUDIT_SIGNING_KEY_MOUNT_PATH: &str = "/etc/portcullis-audit-key";

/// Environment variables set from the pod through the downward API, and the pod fields they
/// come from. The sidecar reads `POD_NAME` as its audit instance id (the host name can be
/// overridden or truncated to 63 characters), and `POD_NAMESPACE` and `SERVICE_ACCOUNT` as
/// the parts of its SPIFFE ID that its shared configuration leaves out.
pub const POD_ENVIRONMENT: [(&str, &str); 3] = [
    ("POD_NAME", "metadata.name"),
    ("POD_NAMESPACE", "metadata.namespace"),
    ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
];

pub(crate) const CONFIG_VOLUME: &str = "portcullis-config";
pub(crate) const POLICY_VOLUME: &str = "portcullis-policy";
pub(crate) const VAULT_TOKEN_VOLUME: &str = "portcullis-vault-token";
pub(crate) const AUDIT_SPOOL_VOLUME: &str = "portcullis-audit-spool";
pub(crate) const AUDIT_SIGNING_KEY_VOLUME: &str = "portcullis-audit-key";

/// Port names are limited to 15 characters and must be unique in the pod.
const GRPC_PORT_NAME: &str = "portcullis-grpc";
const ADMIN_PORT_NAME: &str = "portcullis-http";

/// Startup probe budget: one probe a second for two minutes covers a Vault login, the first
/// certificate and a bundle download on a slow start. Later probes take over after it.
const STARTUP_PERIOD_SECONDS: u32 = 1;
const STARTUP_FAILURE_THRESHOLD: u32 = 120;

/// Returns the container. A native sidecar gets `restartPolicy: Always`, which makes an init
/// container run for the life of the pod. Its startup probe on `/readyz` holds back the next
/// init containers and the application until the policy is loaded.
pub(crate) fn container(template: &SidecarTemplate, native: bool) -> Value {
    let mut container = json!({
        "name": SIDECAR_CONTAINER_NAME,
        "image": template.image,
        "args": ["serve", "--config", CONFIG_FILE_PATH],
        "env": pod_environment(),
        "ports": [
            { "name": GRPC_PORT_NAME, "containerPort": template.grpc_port, "protocol": "TCP" },
            { "name": ADMIN_PORT_NAME, "containerPort": template.admin_port, "protocol": "TCP" },
        ],
        "startupProbe": http_probe("/readyz", template.admin_port, STARTUP_PERIOD_SECONDS, STARTUP_FAILURE_THRESHOLD),
        "readinessProbe": http_probe("/readyz", template.admin_port, 5, 3),
        "livenessProbe": http_probe("/healthz", template.admin_port, 10, 3),
        "resources": template.resources,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": template.run_as_user,
            "runAsGroup": template.run_as_group,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": volume_mounts(template),
    });

    if let Some(policy) = &template.image_pull_policy {
        container["imagePullPolicy"] = Value::from(policy.as_str());
    }
    if native {
        container["restartPolicy"] = Value::from("Always");
    }
    container
}

/// Returns the volumes the container mounts, in a fixed order.
pub(crate) fn volumes(template: &SidecarTemplate) -> Vec<Value> {
    let mut volumes = vec![json!({
        "name": CONFIG_VOLUME,
        "configMap": { "name": template.config_map },
    })];
    if let Some(policy) = &template.policy_config_map {
        volumes.push(json!({
            "name": POLICY_VOLUME,
            "configMap": { "name": policy },
        }));
    }
    if let Some(token) = &template.vault_token {
        volumes.push(json!({
            "name": VAULT_TOKEN_VOLUME,
            "projected": {
                "sources": [{
                    "serviceAccountToken": {
                        "audience": token.audience,
                        "expirationSeconds": token.expiration_seconds,
                        "path": "token",
                    },
                }],
            },
        }));
    }
    if let Some(spool) = &template.audit_spool {
        let mut empty_dir = serde_json::Map::new();
        if let Some(size_limit) = &spool.size_limit {
            empty_dir.insert("sizeLimit".to_owned(), Value::from(size_limit.as_str()));
        }
        if let Some(medium) = spool.medium.as_deref().filter(|medium| !medium.is_empty()) {
            empty_dir.insert("medium".to_owned(), Value::from(medium));
        }
        volumes.push(json!({ "name": AUDIT_SPOOL_VOLUME, "emptyDir": empty_dir }));
    }
    if let Some(secret) = &template.audit_signing_key_secret {
        volumes.push(json!({
            "name": AUDIT_SIGNING_KEY_VOLUME,
            "secret": { "secretName": secret },
        }));
    }
    volumes
}

/// Returns the names of [`volumes`], to check them against the pod's own volumes.
pub(crate) fn volume_names(template: &SidecarTemplate) -> Vec<&'static str> {
    let mut names = vec![CONFIG_VOLUME];
    if template.policy_config_map.is_some() {
        names.push(POLICY_VOLUME);
    }
    if template.vault_token.is_some() {
        names.push(VAULT_TOKEN_VOLUME);
    }
    if template.audit_spool.is_some() {
        names.push(AUDIT_SPOOL_VOLUME);
    }
    if template.audit_signing_key_secret.is_some() {
        names.push(AUDIT_SIGNING_KEY_VOLUME);
    }
    names
}

fn volume_mounts(template: &SidecarTemplate) -> Vec<Value> {
    let mut mounts = vec![json!({
        "name": CONFIG_VOLUME,
        "mountPath": CONFIG_MOUNT_PATH,
        "readOnly": true,
    })];
    if template.policy_config_map.is_some() {
        mounts.push(
            json!({ "name": POLICY_VOLUME, "mountPath": POLICY_MOUNT_PATH, "readOnly": true }),
        );
    }
    if template.vault_token.is_some() {
        mounts.push(json!({ "name": VAULT_TOKEN_VOLUME, "mountPath": VAULT_TOKEN_MOUNT_PATH, "readOnly": true }));
    }
    if template.audit_spool.is_some() {
        mounts.push(json!({ "name": AUDIT_SPOOL_VOLUME, "mountPath": AUDIT_SPOOL_MOUNT_PATH }));
    }
    if template.audit_signing_key_secret.is_some() {
        mounts.push(json!({ "name": AUDIT_SIGNING_KEY_VOLUME, "mountPath": AUDIT_SIGNING_KEY_MOUNT_PATH, "readOnly": true }));
    }
    mounts
}

fn pod_environment() -> Vec<Value> {
    POD_ENVIRONMENT
        .iter()
        .map(|(name, field)| json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": field } } }))
        .collect()
}

fn http_probe(path: &str, port: u16, period_seconds: u32, failure_threshold: u32) -> Value {
    json!({
        "httpGet": { "path": path, "port": port, "scheme": "HTTP" },
        "periodSeconds": period_seconds,
        "timeoutSeconds": 1,
        "failureThreshold": failure_threshold,
    })
}
