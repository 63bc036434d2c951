//! The Kubernetes mutating admission webhook that injects the portcullis sidecar into pods.
//!
//! [`mutate`] turns an `admission.k8s.io/v1` AdmissionReview for a pod into the review
//! response: a JSON Patch that adds the portcullis container and its volumes, or no patch
//! when the pod opted out or was injected before. [`serve`] serves such reviews over HTTPS
//! on `POST /mutate` and reports liveness on `GET /healthz`.
//!
//! Pods are handled as `serde_json::Value` trees. The injector reads only the few fields it
//! needs, so fields added by newer Kubernetes versions pass through untouched.

mod config;
mod error;
mod patch;
mod pod;
mod review;
mod server;
mod sidecar;
mod tls;
mod version;

pub use config::{
    AuditSpool, ConfigProblem, DEFAULT_LISTEN_ADDRESS, FailurePolicy, InjectorConfig,
    InjectorOptions, ListenOptions, SidecarTemplate, TlsOptions, VaultToken,
};
pub use error::InjectError;
pub use pod::{INJECT_ANNOTATION, INJECT_LABEL, INJECTED_ANNOTATION, SIDECAR_CONTAINER_NAME};
pub use review::mutate;
pub use server::{Injector, serve};
pub use sidecar::{
    AUDIT_SIGNING_KEY_MOUNT_PATH, AUDIT_SPOOL_MOUNT_PATH, CONFIG_FILE_PATH, CONFIG_MOUNT_PATH,
    POD_ENVIRONMENT, POLICY_MOUNT_PATH, VAULT_TOKEN_MOUNT_PATH, VAULT_TOKEN_PATH,
};
pub use version::{KubernetesVersion, NATIVE_SIDECAR_MINIMUM};
