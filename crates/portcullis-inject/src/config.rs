//! Settings of the injector: where the webhook listens, its TLS files, and the sidecar it adds.
//!
//! The file is YAML (JSON is YAML too). Unknown keys are errors, and every problem is reported
//! with its key path.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::error::InjectError;
use crate::version::KubernetesVersion;

/// Address the webhook listens on when none is configured: every interface, because the
/// Kubernetes API server reaches the injector through its Service.
pub const DEFAULT_LISTEN_ADDRESS: &str = "0.0.0.0:8443";

/// How often the certificate files are read again. cert-manager renews a certificate well
/// before it expires and kubelet updates a mounted Secret within about a minute, so one
/// minute keeps the served certificate fresh at the cost of two small file reads.
const DEFAULT_TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(60);

/// Shortest lifetime that Kubernetes accepts for a projected service account token.
const MIN_TOKEN_EXPIRATION_SECONDS: i64 = 600;
/// Maximum lifetime of a projected token, as Kubernetes bounds `expirationSeconds`.
const MAX_TOKEN_EXPIRATION_SECONDS: i64 = 1 << 32;

/// Everything `portcullis inject` needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectorOptions {
    #[serde(default)]
    pub listen: ListenOptions,
    pub tls: TlsOptions,
    pub injection: InjectorConfig,
}

/// The HTTPS listener of the webhook.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenOptions {
    #[serde(default = "default_listen_address")]
    pub address: SocketAddr,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            address: default_listen_address(),
        }
    }
}

/// The serving certificate. Both files are PEM; they are read again every `reload_interval`,
/// so a renewed certificate in a mounted Secret is served without a restart.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsOptions {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Private key in PKCS#8, PKCS#1 or SEC1 form.
    pub key_file: PathBuf,
    #[serde(
        default = "default_tls_reload_interval",
        deserialize_with = "deserialize_duration"
    )]
    pub reload_interval: Duration,
}

/// Injection settings: the sidecar template, the cluster version and the failure policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectorConfig {
    /// Version of the cluster's API server. From 1.29 on the sidecar is a native sidecar (an
    /// init container with `restartPolicy: Always`); before, or when unknown, it is a regular
    /// container.
    #[serde(default, deserialize_with = "deserialize_version")]
    pub kubernetes_version: Option<KubernetesVersion>,
    /// Response to a pod that the injector cannot inject.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    pub sidecar: SidecarTemplate,
}

/// Response to a pod that cannot be injected, named after the webhook's `failurePolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum FailurePolicy {
    /// Admit the pod unchanged with a warning.
    #[default]
    Ignore,
    /// Reject the pod with the reason.
    Fail,
}

/// The portcullis container and the objects its volumes come from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarTemplate {
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`; absent leaves Kubernetes' default.
    #[serde(default)]
    pub image_pull_policy: Option<String>,
    /// Port of the ext_authz gRPC listener, as in the sidecar's `listen.address`.
    #[serde(default = "default_grpc_port")]
    pub grpc_port: u16,
    /// Port of the admin listener (`/healthz`, `/readyz`, `/metrics`), probed by kubelet.
    #[serde(default = "default_admin_port")]
    pub admin_port: u16,
    #[serde(default = "default_non_root_id")]
    pub run_as_user: i64,
    #[serde(default = "default_non_root_id")]
    pub run_as_group: i64,
    /// The container's `resources` object, copied as given.
    #[serde(default = "default_resources")]
    pub resources: Map<String, Value>,
    /// ConfigMap with the key `config.yaml`, mounted at [`crate::CONFIG_MOUNT_PATH`].
    pub config_map: String,
    /// ConfigMap holding the policy bundle files, mounted at [`crate::POLICY_MOUNT_PATH`].
    /// Absent when the bundle comes from elsewhere, such as a folder in the image.
    #[serde(default)]
    pub policy_config_map: Option<String>,
    /// A projected service account token for logging in to Vault. Absent without Vault.
    #[serde(default)]
    pub vault_token: Option<VaultToken>,
    /// An emptyDir for the audit spool or state file. Absent when the sidecar keeps neither.
    #[serde(default)]
    pub audit_spool: Option<AuditSpool>,
    /// Secret holding the audit checkpoint signing key, mounted at
    /// [`crate::AUDIT_SIGNING_KEY_MOUNT_PATH`]. Absent when checkpoints are not signed.
    #[serde(default)]
    pub audit_signing_key_secret: Option<String>,
}

/// The projected service account token that the sidecar presents to Vault's Kubernetes
/// auth method.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultToken {
    /// Audience of the token; Vault's Kubernetes auth role must list it.
    #[serde(default = "default_vault_audience")]
    pub audience: String,
    /// Lifetime of the token; kubelet replaces it after 80 % of it has passed.
    #[serde(default = "default_token_expiration_seconds")]
    pub expiration_seconds: i64,
}

/// The emptyDir that stores decision events until Kafka acknowledges them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSpool {
    /// Kubernetes quantity such as `1Gi`; kubelet evicts the pod when the spool grows past it.
    #[serde(default)]
    pub size_limit: Option<String>,
    /// `Memory` puts the spool on tmpfs, which does not survive a node restart; absent means
    /// the node's disk.
    #[serde(default)]
    pub medium: Option<String>,
}

/// One invalid setting, named by its key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl InjectorOptions {
    /// Reads and validates the options file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, InjectError> {
        let text = std::fs::read_to_string(path).map_err(|source| InjectError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|problems| InjectError::InvalidConfig {
            path: path.to_path_buf(),
            problems,
        })
    }

    /// Parses and validates options from YAML or JSON text.
    pub fn from_yaml(text: &str) -> Result<Self, Vec<ConfigProblem>> {
        let value = yaml_to_json(text).map_err(|message| {
            vec![ConfigProblem {
                path: "(document)".to_owned(),
                message,
            }]
        })?;

        let options: InjectorOptions =
            serde_path_to_error::deserialize(value).map_err(|error| {
                vec![ConfigProblem {
                    path: key_path(error.path()),
                    message: error.inner().to_string(),
                }]
            })?;

        let problems = options.injection.problems("injection");
        if problems.is_empty() {
            Ok(options)
        } else {
            Err(problems)
        }
    }
}

impl InjectorConfig {
    /// Lists every invalid value, each with its key path under `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut report = |key: &str, message: String| {
            problems.push(ConfigProblem {
                path: format!("{prefix}.sidecar.{key}"),
                message,
            });
        };
        let sidecar = &self.sidecar;

        if sidecar.image.trim().is_empty() {
            report("image", "must not be empty".to_owned());
        }
        if let Some(policy) = &sidecar.image_pull_policy
            && !["Always", "IfNotPresent", "Never"].contains(&policy.as_str())
        {
            report(
                "image_pull_policy",
                format!("invalid value {policy:?}; expected one of: Always, IfNotPresent, Never"),
            );
        }
        if sidecar.grpc_port == 0 {
            report("grpc_port", "must be between 1 and 65535".to_owned());
        }
        if sidecar.admin_port == 0 {
            report("admin_port", "must be between 1 and 65535".to_owned());
        }
        if sidecar.grpc_port == sidecar.admin_port {
            report(
                "admin_port",
                format!("must differ from grpc_port {}", sidecar.grpc_port),
            );
        }
        if sidecar.run_as_user <= 0 {
            report(
                "run_as_user",
                format!(
                    "invalid user id {}; the sidecar runs as a non-root user",
                    sidecar.run_as_user
                ),
            );
        }
        if sidecar.run_as_group < 0 {
            report(
                "run_as_group",
                format!("invalid group id {}", sidecar.run_as_group),
            );
        }
        if let Some(message) = invalid_object_name(&sidecar.config_map) {
            report("config_map", message);
        }
        if let Some(name) = &sidecar.policy_config_map
            && let Some(message) = invalid_object_name(name)
        {
            report("policy_config_map", message);
        }
        if let Some(token) = &sidecar.vault_token {
            if token.audience.trim().is_empty() {
                report("vault_token.audience", "must not be empty".to_owned());
            }
            if !(MIN_TOKEN_EXPIRATION_SECONDS..=MAX_TOKEN_EXPIRATION_SECONDS)
                .contains(&token.expiration_seconds)
            {
                report(
                    "vault_token.expiration_seconds",
                    format!(
                        "invalid value {}; Kubernetes accepts {MIN_TOKEN_EXPIRATION_SECONDS} to {MAX_TOKEN_EXPIRATION_SECONDS}",
                        token.expiration_seconds
                    ),
                );
            }
        }
        if let Some(spool) = &sidecar.audit_spool
            && let Some(medium) = &spool.medium
            && !["", "Memory"].contains(&medium.as_str())
        {
            report(
                "audit_spool.medium",
                format!("invalid value {medium:?}; expected Memory or no value"),
            );
        }
        if let Some(name) = &sidecar.audit_signing_key_secret
            && let Some(message) = invalid_object_name(name)
        {
            report(
                "audit_signing_key_secret",
                message.replace("ConfigMap", "Secret"),
            );
        }

        problems
    }

    /// Returns whether the sidecar goes in as a native sidecar (first init container with
    /// `restartPolicy: Always`) instead of a regular container.
    pub fn native_sidecar(&self) -> bool {
        self.kubernetes_version
            .is_some_and(KubernetesVersion::supports_native_sidecars)
    }
}

/// Checks a ConfigMap name against the DNS subdomain rules of Kubernetes object names.
fn invalid_object_name(name: &str) -> Option<String> {
    let valid_characters = name.bytes().all(|byte| {
        byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'.'
    });
    let alphanumeric_ends = name
        .bytes()
        .next()
        .zip(name.bytes().last())
        .is_some_and(|(first, last)| first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric());
    if name.len() <= 253 && valid_characters && alphanumeric_ends {
        None
    } else {
        Some(format!(
            "invalid ConfigMap name {name:?}; expected lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit, at most 253 characters"
        ))
    }
}

fn key_path(path: &serde_path_to_error::Path) -> String {
    let text = path.to_string();
    if text == "." {
        "(document)".to_owned()
    } else {
        text
    }
}

/// Converts a single YAML document into a JSON value. Aliases and tags are rejected, because
/// a settings file has no use for them.
fn yaml_to_json(text: &str) -> Result<Value, String> {
    use saphyr::{LoadableYamlNode, Yaml};

    let documents = Yaml::load_from_str(text).map_err(|error| {
        format!(
            "invalid YAML at line {}, column {}: {}",
            error.marker().line(),
            error.marker().col() + 1,
            error.info()
        )
    })?;
    match documents.as_slice() {
        [] => Ok(Value::Object(Map::new())),
        [document] => yaml_node_to_json(document),
        _ => Err("more than one YAML document; the file must contain exactly one".to_owned()),
    }
}

fn yaml_node_to_json(node: &saphyr::Yaml<'_>) -> Result<Value, String> {
    use saphyr::{Scalar, Yaml};

    match node {
        Yaml::Value(Scalar::Null) => Ok(Value::Null),
        Yaml::Value(Scalar::Boolean(value)) => Ok(Value::Bool(*value)),
        Yaml::Value(Scalar::Integer(value)) => Ok(Value::from(*value)),
        Yaml::Value(Scalar::FloatingPoint(value)) => {
            serde_json::Number::from_f64(value.into_inner())
                .map(Value::Number)
                .ok_or_else(|| format!("unsupported number {value}"))
        }
        Yaml::Value(Scalar::String(value)) => Ok(Value::String(value.to_string())),
        Yaml::Representation(text, _, _) => Ok(Value::String(text.to_string())),
        Yaml::Sequence(items) => items
            .iter()
            .map(yaml_node_to_json)
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Yaml::Mapping(entries) => {
            let mut object = Map::new();
            for (key, value) in entries {
                let Yaml::Value(Scalar::String(key)) = key else {
                    return Err(format!(
                        "unsupported mapping key {key:?}; keys must be strings"
                    ));
                };
                object.insert(key.to_string(), yaml_node_to_json(value)?);
            }
            Ok(Value::Object(object))
        }
        Yaml::Tagged(tag, _) => Err(format!("unsupported YAML tag {tag}")),
        Yaml::Alias(_) => Err("unsupported YAML alias".to_owned()),
        Yaml::BadValue => Err("invalid YAML value".to_owned()),
    }
}

fn deserialize_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|error| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?} ({error}); expected a duration such as 30s or 1m"
        ))
    })
}

fn deserialize_version<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<KubernetesVersion>, D::Error> {
    match Option::<String>::deserialize(deserializer)? {
        None => Ok(None),
        Some(text) if text.trim().is_empty() => Ok(None),
        Some(text) => KubernetesVersion::parse(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

fn default_listen_address() -> SocketAddr {
    DEFAULT_LISTEN_ADDRESS
        .parse()
        .expect("DEFAULT_LISTEN_ADDRESS is a valid socket address")
}

fn default_tls_reload_interval() -> Duration {
    DEFAULT_TLS_RELOAD_INTERVAL
}

/// Returns the port of `listen.address` in the sidecar's example configuration.
fn default_grpc_port() -> u16 {
    9191
}

/// Returns the port of `admin.address` in the sidecar's example configuration.
fn default_admin_port() -> u16 {
    9192
}

/// Returns the `nonroot` user and group of distroless base images.
fn default_non_root_id() -> i64 {
    65532
}

/// Starting values, to be tuned for the real load: small requests so that every pod can be
/// scheduled, a memory limit that bounds a runaway policy, and no CPU limit, which would
/// throttle the check path.
fn default_resources() -> Map<String, Value> {
    let resources = serde_json::json!({
        "requests": { "cpu": "50m", "memory": "64Mi" },
        "limits": { "memory": "256Mi" },
    });
    match resources {
        Value::Object(map) => map,
        _ => unreachable!("the literal above is an object"),
    }
}

fn default_vault_audience() -> String {
    "vault".to_owned()
}

/// Returns one hour: short enough that a leaked token is soon useless, and far above the ten-minute
/// minimum of Kubernetes.
fn default_token_expiration_seconds() -> i64 {
    3600
}

#[cfg(test)]
mod tests;
